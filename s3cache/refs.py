"""The identity of an object: a bucket and a key, and the ``s3://`` URI that names them.

A version is not part of the identity: the manifest says which version to fetch, and the cache keeps
one version of each key. That keeps the reader's view simple (``s3://bucket/key`` always names one
local file) and lets a changed manifest replace a stale file in place.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import UnsafeKey

# S3's rules plus the legacy ones (upper case, underscores) that old buckets still use. A bucket name
# is one path segment in the cache dir, so it must never be "." or ".." or start with a dot.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,62}$")
MAX_KEY_BYTES = 1024  # S3's own limit


class ObjectRef(NamedTuple):
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return self.uri


def check_bucket(bucket: str) -> str:
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise UnsafeKey(f"invalid bucket name {bucket!r}")
    return bucket


def check_key(key: str) -> str:
    if not key:
        raise UnsafeKey("empty key")
    if "\x00" in key:
        raise UnsafeKey(f"key contains a NUL byte: {key!r}")
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise UnsafeKey(f"key is not valid Unicode: {key!r}") from e
    if n > MAX_KEY_BYTES:
        raise UnsafeKey(f"key is {n} bytes, S3 allows at most {MAX_KEY_BYTES}")
    return key


def make_ref(bucket: str, key: str) -> ObjectRef:
    return ObjectRef(check_bucket(bucket), check_key(key))


def parse_uri(uri: str | ObjectRef) -> ObjectRef:
    """``s3://bucket/key`` to an ObjectRef. The key is taken verbatim (no percent-decoding)."""
    if isinstance(uri, ObjectRef):
        return uri
    if not isinstance(uri, str):
        raise UnsafeKey(f"not an s3:// URI: {uri!r}")
    if not uri.startswith("s3://"):
        raise UnsafeKey(f"not an s3:// URI: {uri!r}")
    bucket, sep, key = uri[5:].partition("/")
    if not sep or not key:
        raise UnsafeKey(f"URI names no object (s3://bucket/key expected): {uri!r}")
    return make_ref(bucket, key)
