"""The identity of an object: a bucket and a key, and the ``s3://`` URI that names them.

A version is not part of the identity: the manifest says which version to fetch, and the cache keeps
one version of each key. That keeps the reader's view simple (``s3://bucket/key`` always names one
local file) and lets a changed manifest replace a stale file in place.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import NamedTuple

from .errors import UnsafeKey

# S3's bucket naming rules (general purpose buckets): 3-63 characters of lower-case letters, digits, dots
# and hyphens, beginning and ending with a letter or digit, no two adjacent dots, not an IP address, none
# of the reserved prefixes and suffixes. A name outside them cannot exist in S3, so refusing it locally
# says so at once instead of sending a request that comes back NoSuchBucket. (Legacy us-east-1 names with
# upper case or underscores are refused too: S3 stopped allowing them in 2018 and virtual-hosted
# addressing cannot reach them.) A bucket name is one path segment in the cache dir, and these rules
# also keep it from being "." or ".." or starting with a dot.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap")  # "--x-s3" names directory buckets: valid
MAX_KEY_BYTES = 1024  # S3's own limit


class ObjectRef(NamedTuple):
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return self.uri


@functools.lru_cache(maxsize=1024)  # a manifest names a few buckets a million times
def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name, or None if it is."""
    if not 3 <= len(bucket) <= 63:
        return f"must be 3 to 63 characters long, not {len(bucket)}"
    if not _BUCKET_RE.match(bucket):
        return "must be lower-case letters, digits, dots and hyphens, and begin and end with a letter or digit"
    if ".." in bucket:
        return "must not contain two adjacent dots"
    if _IPV4_LIKE.fullmatch(bucket):
        try:
            ipaddress.IPv4Address(bucket)
        except ValueError:
            pass
        else:
            return "must not be formatted as an IP address"
    for p in _RESERVED_PREFIXES:
        if bucket.startswith(p):
            return f"must not begin with {p!r} (reserved by S3)"
    for sfx in _RESERVED_SUFFIXES:
        if bucket.endswith(sfx):
            return f"must not end with {sfx!r} (reserved by S3)"
    return None


def check_bucket(bucket: str) -> str:
    """``bucket`` if it follows S3's bucket naming rules; else UnsafeKey saying which rule it breaks."""
    problem = bucket_problem(bucket)
    if problem is not None:
        raise UnsafeKey(f"invalid bucket name {bucket!r}: {problem}")
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


def printable(text: str) -> str:
    """``text`` fit for one line of a log or a terminal: every character that is not printable (a
    newline, ESC, other C0/C1 controls, line and paragraph separators) written as its Python escape
    (``\\n``, ``\\x1b``), so a key can neither start a forged log line nor send a terminal control
    sequence. Printable text, non-ASCII included, is returned as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(uri: str | ObjectRef) -> str:
    """A URI as the daemon logs it and status text prints it: ``printable(uri)``."""
    return printable(str(uri))
