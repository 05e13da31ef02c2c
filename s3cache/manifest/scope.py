"""Demand scope: which objects a reader may make the daemon fetch with the host's S3 credentials.

Anyone who can reach ``ctl.sock`` (every member of the cache dir's group) can ask the daemon for an
object; the daemon fetches it with its own credentials (often the instance role) and publishes it
group-readable. Without a limit, that hands the role's S3 read access to every member of the group.
So a demand fetch (a ``want``, an ``ahead`` hint) is for an object **in scope**:

* an object the current manifest lists (any share's: a reader may read another host's objects);
* an object under one of the manifest's ``prefix/`` lines (objects uploaded since it was listed too);
* an object under an ``--allow`` prefix: ``s3://bucket/prefix/``, ``s3://bucket/`` for a whole bucket,
  or ``s3://`` for every object the credentials can read (an explicit choice, warned about at start).

A bucket is never in scope merely because the manifest names some of its objects: a manifest listing
two files of a bucket does not open the rest of it. Without a manifest only ``--allow`` is in scope, and
with neither nothing is: a daemon on a shared host fetches only what its operator wrote down. Files
already cached are served whatever the scope (they are on disk, readable by the group already).

Pure: no I/O, no locks; the caller passes the catalog it holds under its lock, so the scope follows
manifest reloads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from s3cache.errors import ConfigError, OutOfScope

from .catalog import Catalog
from .refs import ObjectRef, bucket_problem

EVERYTHING = "s3://"
_SEPARATORS = re.compile(r"[\s,]+")
_FORM = "s3://bucket/prefix/, s3://bucket/ for a whole bucket, or s3:// for every object"


def parse_allow(text: str) -> str:
    """One ``--allow`` value in its canonical form (``s3://bucket/`` or ``s3://bucket/prefix/``, or
    ``s3://`` for everything). Raises ConfigError naming the form expected."""
    if text == EVERYTHING:
        return text
    if not text.startswith("s3://"):
        raise ConfigError(f"not an s3:// prefix: {text!r} (expected {_FORM})")
    bucket, sep, prefix = text[5:].partition("/")
    problem = bucket_problem(bucket)
    if problem is not None:
        raise ConfigError(f"invalid bucket name in {text!r}: {problem}")
    if prefix and not prefix.endswith("/"):
        # A prefix like s3://b/train would also open s3://b/train-private/: say where it ends.
        raise ConfigError(f"a prefix must end with '/': {text!r} (expected {_FORM})")
    return f"s3://{bucket}/{prefix}"


def parse_allow_list(raw: Any) -> tuple[str, ...]:
    """``--allow`` values: one text of prefixes separated by spaces or commas, or a list of them (TOML).
    Canonical, duplicates dropped, in the order given."""
    if isinstance(raw, str):
        items = [t for t in _SEPARATORS.split(raw) if t]
    elif isinstance(raw, (list, tuple)) and all(isinstance(t, str) for t in raw):
        items = list(raw)
    else:
        raise ConfigError(f"not a list of s3:// prefixes: {raw!r} (expected {_FORM})")
    return tuple(dict.fromkeys(parse_allow(t) for t in items))


class Scope:
    """The demand scope: the ``--allow`` prefixes, plus whatever catalog the caller holds.

    Invariant: ``allow`` holds canonical prefixes (``parse_allow``) grouped by bucket in ``_by_bucket``
    (bucket -> key prefixes; "" is the whole bucket); ``_all`` is whether ``s3://`` was given.
    """

    def __init__(self, allow: Iterable[str] = (), *, has_manifest: bool = False) -> None:
        self.allow = parse_allow_list(tuple(allow))
        self.has_manifest = has_manifest
        self._all = EVERYTHING in self.allow
        self._by_bucket: dict[str, tuple[str, ...]] = {}
        for p in self.allow:
            if p != EVERYTHING:
                bucket, _, prefix = p[5:].partition("/")
                self._by_bucket[bucket] = self._by_bucket.get(bucket, ()) + (prefix,)

    def allows(self, ref: ObjectRef, catalog: Catalog) -> bool:
        """Whether a reader may have the daemon fetch ``ref`` while ``catalog`` is the manifest."""
        if self._all:
            return True
        if any(ref.key.startswith(p) for p in self._by_bucket.get(ref.bucket, ())):
            return True
        if any(b == ref.bucket and ref.key.startswith(p) for b, p in catalog.prefixes):
            return True
        uri = ref.uri
        # off_share judges by a 64-bit hash of the key (the other shares' lines are not kept). With
        # Python's per-process hash seed a reader cannot aim at a collision; the odds of meeting one
        # by chance are about (manifest size) / 2**64.
        return catalog.position(uri) is not None or catalog.off_share(uri)

    def check(self, ref: ObjectRef, catalog: Catalog) -> None:
        """Raise OutOfScope (naming the rule) unless ``allows(ref, catalog)``."""
        if not self.allows(ref, catalog):
            raise OutOfScope(ref.uri, self.rule())

    def rule(self) -> str:
        """The rule, as a refused reader reads it."""
        if self.allow:
            shown = ", ".join(self.allow[:3]) + (f" and {len(self.allow) - 3} more" if len(self.allow) > 3 else "")
            allowed = f"under --allow {shown}"
        else:
            allowed = "under an --allow prefix (none given)"
        where = "in the manifest, under one of its prefix/ lines, or " if self.has_manifest else ""
        return (f"not in the daemon's demand scope: it fetches on demand only objects {where}{allowed}; "
                "add it to the manifest or to serve's --allow")

    def warning(self) -> str | None:
        """What to log at start when the scope is all or nothing, else None."""
        if self._all:
            return ("--allow s3:// : every member of the cache dir's group can make the daemon fetch any object "
                    "its credentials can read")
        if not self.allow and not self.has_manifest:
            return ("no manifest and no --allow: readers' requests for objects not cached are refused "
                    "(OutOfScope); give --allow s3://BUCKET/PREFIX/ for what they may fetch")
        return None
