"""``s3cache.manifest_uris(path)``: a manifest's objects as training code needs them.

Every object in manifest order, each ``prefix/`` line replaced by its listing in key order, exactly as
the daemon expands the manifest: the list the multi-host rule asks every worker to build, since
``--shard I/N`` and tf.data's ``shard(N, I)`` both count positions in it. Duplicates stay where they are
(the daemon fetches such an object once, but counts each line's position). URIs come percent-encoded
as the manifest writes them, so each one passes back through ``resolve()`` unchanged.

Invariant: boto3 is imported only when the manifest has a prefix line to list (the package's
``manifest_uris`` loads this module on call, so ``import s3cache`` never loads boto3).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from s3cache.manifest.parse import Listed, Prefix, SkipLog, expand, read


def manifest_uris(path: str | os.PathLike, *, endpoint_url: str | None = None,
                  region: str | None = None) -> list[str]:
    """The URIs of the manifest at ``path``, prefix lines expanded, in the daemon's order.

    ``endpoint_url`` / ``region``: for listing prefix lines (default: boto3's configuration, e.g.
    ``AWS_ENDPOINT_URL``, ``AWS_REGION``), with the caller's credentials. Keys a listing returns that the
    daemon would skip are skipped here too. Raises ManifestError naming the file and line of a bad line,
    FetchFailed when a prefix cannot be listed (AccessDenied, EndpointUnreachable, ...)."""
    items = list(read(os.fspath(path)))
    if not any(isinstance(i, Prefix) for i in items):
        return [e.ref.display for e in items]
    from .listing import (  # boto3: only for a manifest that lists prefixes
        _pages,
        make_client,
    )

    client = make_client(endpoint_url, region)

    def lister(bucket: str, prefix: str) -> Iterator[Listed]:
        for page in _pages(client, bucket, prefix):
            for obj in page:
                yield Listed(obj.get("Key"), obj.get("Size"), str(obj.get("ETag", "")))

    return [e.ref.display for e in expand(items, lister, SkipLog())]
