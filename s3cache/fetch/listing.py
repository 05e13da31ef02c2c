"""``s3cache manifest s3://bucket/prefix/``: list a prefix and write it as a manifest.

One line per object, in key order (ListObjectsV2, paginated), with ``size=``; keys percent-encoded
exactly as the manifest parser decodes them (the catalog's canonical form). Folder markers (keys ending
in ``/``) are left out, and so are keys the daemon would refuse (over 1024 bytes, a NUL), with a warning.

Checksums: a listing carries none. ListObjectsV2 names an object's additional checksum algorithm
(``ChecksumAlgorithm``) but not its value, and it does not say how the object is encrypted, so its ETag
cannot be written as ``md5=``: under SSE-KMS or SSE-C an ETag is not the MD5 of the bytes, and a wrong
``md5=`` would fail every fetch. With ``checksums=True`` each object is asked for with HeadObject
(``ChecksumMode=ENABLED``, one request an object, in parallel) and gets ``sha256=`` / ``crc64nvme=`` / ``crc32c=`` / ``crc32=`` when
S3 stores a whole-object checksum of that kind (read as the fetcher reads it: ``checks.part_count``, so a
composite checksum from a server that does not say so is never written as the object's), and ``md5=``
from a single-part ETag when the object is neither SSE-KMS nor SSE-C encrypted. Without them the daemon still verifies every object against what
S3 gives at fetch time; written into the manifest they also pin the content: an object rewritten after
the manifest was made is refused instead of cached.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TextIO

import boto3
import botocore.config
import botocore.exceptions

from s3cache.errors import FetchFailed, UnsafeKey
from s3cache.manifest.catalog import format_entry
from s3cache.manifest.parse import MAX_OBJECT_SIZE, Entry, SkipLog
from s3cache.manifest.refs import ObjectRef, check_bucket, check_key
from s3cache.service.config import redact_url

from .checks import S3_CHECKSUMS, etag_is_digest, part_count

_PLAIN_ETAG = re.compile(r"[0-9a-f]{32}")
# S3's whole-object checksums a manifest line can state, by the fetcher's method name.
_FIELDS = {"s3-sha256": "sha256", "s3-md5": "md5", "s3-crc64nvme": "crc64nvme", "s3-crc32c": "crc32c",
           "s3-crc32": "crc32"}
_EXPLAINED = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "the credentials in use may not list this bucket",
    "AllAccessDisabled": "all access to this bucket has been disabled",
    "InvalidAccessKeyId": "the access key is not known to this endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "PermanentRedirect": "the bucket is in another region (give --region)",
}


def parse_prefix_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` (or ``s3://bucket``) to (bucket, prefix). Raises UnsafeKey."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise UnsafeKey(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix/)")
    bucket, _, prefix = uri[5:].partition("/")
    check_bucket(bucket)
    if prefix and ("\x00" in prefix or len(prefix.encode("utf-8", "surrogatepass")) > 1024):
        raise UnsafeKey(f"not a usable prefix: {prefix[:80]!r}")
    return bucket, prefix


def make_client(endpoint_url: str | None, region: str | None):
    cfg = botocore.config.Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10,
                                 read_timeout=60, max_pool_connections=16)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


def write_manifest(client, bucket: str, prefix: str, out: TextIO, *, pattern: str | None = None,
                   checksums: bool = False, workers: int = 16) -> tuple[int, SkipLog]:
    """Write the manifest of ``s3://bucket/prefix`` to ``out``; (lines written, keys skipped).

    Nothing is written unless the whole listing succeeded (it is gathered in a spooled temporary file
    first), so ``> m.txt`` never leaves half a manifest. Raises FetchFailed naming the S3 error code.
    """
    skipped = SkipLog(log_first=0)  # the caller shows them
    n = 0
    with tempfile.SpooledTemporaryFile(max_size=16 << 20, mode="w+", encoding="utf-8") as spool:
        for line in manifest_lines(client, bucket, prefix, pattern=pattern, checksums=checksums,
                                   skipped=skipped, workers=workers):
            spool.write(line + "\n")
            n += 1
        spool.seek(0)
        shutil.copyfileobj(spool, out)
    skipped.close()
    return n, skipped


def manifest_lines(client, bucket: str, prefix: str, *, pattern: str | None = None, checksums: bool = False,
                   skipped: SkipLog | None = None, workers: int = 16, page_size: int | None = None) -> Iterator[str]:
    """Manifest lines for the objects under the prefix, in key order (see the module docstring).

    ``pattern`` is a shell pattern (fnmatch, case-sensitive) matched against the key after the prefix;
    ``*`` matches across ``/`` too.
    """
    skips = skipped if skipped is not None else SkipLog()
    with ThreadPoolExecutor(max_workers=workers) if checksums else nullcontext() as pool:
        for page in _pages(client, bucket, prefix, page_size):
            entries = []
            for obj in page:
                key, size = obj.get("Key"), obj.get("Size")
                if not isinstance(key, str) or key.endswith("/"):
                    continue
                if not key.startswith(prefix):  # a listing (a proxy, a buggy store) that strays
                    skips.add(bucket, key, f"outside the prefix {prefix!r} asked for")
                    continue
                if pattern is not None and not fnmatch.fnmatchcase(key[len(prefix):], pattern):
                    continue
                try:
                    check_key(key)
                except UnsafeKey as e:
                    skips.add(bucket, key, str(e).split(":")[0])
                    continue
                if not isinstance(size, int) or not 0 <= size <= MAX_OBJECT_SIZE:
                    skips.add(bucket, key, f"the listing gives size {size!r}")
                    continue
                entries.append(Entry(ObjectRef(bucket, key), size))
            if checksums:
                entries = list(pool.map(lambda e: _with_checksums(client, e), entries))
            for e in entries:
                yield format_entry(e)


def _pages(client, bucket: str, prefix: str, page_size: int | None = None) -> Iterator[list[dict]]:
    uri = f"s3://{bucket}/{prefix}"
    paging = {"PageSize": page_size} if page_size else {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                     PaginationConfig=paging):
            yield page.get("Contents", [])
    except botocore.exceptions.ClientError as e:
        raise _failed(uri, e) from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as e:
        tried = redact_url(str(e.kwargs.get("endpoint_url") or "")).split("?", 1)[0]  # the URL, not the query
        raise FetchFailed(uri, "EndpointUnreachable",
                          f"cannot reach the S3 endpoint {tried or '(unknown URL)'} ({type(e).__name__})") from None
    except botocore.exceptions.NoCredentialsError:
        raise FetchFailed(uri, "NoCredentials", "no AWS credentials found (environment, profile or role)") from None
    except botocore.exceptions.BotoCoreError as e:
        raise FetchFailed(uri, type(e).__name__, "the request failed") from None


def _failed(uri: str, e: botocore.exceptions.ClientError) -> FetchFailed:
    code = str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {})
               .get("HTTPStatusCode", "Unknown"))
    return FetchFailed(uri, code, _EXPLAINED.get(code, ""))


def _with_checksums(client, e: Entry) -> Entry:
    """``e`` with the whole-object checksums S3 stores for it (see the module docstring)."""
    try:
        head = client.head_object(Bucket=e.ref.bucket, Key=e.ref.key, ChecksumMode="ENABLED")
    except botocore.exceptions.ClientError as err:
        raise _failed(e.uri, err) from None
    except botocore.exceptions.BotoCoreError as err:
        raise FetchFailed(e.uri, type(err).__name__, "HeadObject failed") from None
    etag = str(head.get("ETag", "")).strip('"')
    found: dict[str, str] = {}
    for field, method, nbytes in S3_CHECKSUMS:
        name, value = _FIELDS.get(method), head.get(field)
        if name is None or not value or part_count(method, value, etag, head.get("ChecksumType")):
            continue  # a checksum of part checksums is not the bytes' checksum (the fetcher's rule)
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == nbytes:
            found.setdefault(name, raw.hex())
    if _PLAIN_ETAG.fullmatch(etag) and etag_is_digest(head):
        found.setdefault("md5", etag)
    size = int(head.get("ContentLength", e.size))
    return e._replace(size=size, **found)
