"""The identity of an object: a bucket and a key, and the ``s3://`` URI that names them.

Two forms of a URI, one rule (README, "URIs"):

* What users write and read (the manifest, ``resolve()``, ``s3cache resolve/pin/verify``, status and
  logs): the key is percent-decoded exactly as in the manifest, ``%XX`` (two hex digits, the UTF-8
  bytes) stands for that byte: ``%20`` a space, ``%23`` '#', ``%25`` '%'. A '%' not followed by two hex
  digits is taken as itself here (the manifest refuses it, to catch typos in a file). ``parse_uri``
  reads it, at entry points only; ``format_uri`` / ``ObjectRef.display`` write it, quoting exactly as
  ``s3cache manifest`` does, so anything printed can be pasted back.
* The identity (``ObjectRef.uri``): ``s3://bucket/`` + the raw key. Index rows, the catalog, the wire
  between readers and the daemon (``want``, usage notes, events, ``order_list``) and the daemon's own
  dicts use it. ``from_identity`` turns it back into a ref WITHOUT decoding: decoding an identity again
  would turn the key ``a%41`` into ``aA``.

A version is not part of the identity: the manifest says which version to fetch, and the cache keeps
one version of each key. That keeps the reader's view simple (``s3://bucket/key`` always names one
local file) and lets a changed manifest replace a stale file in place.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import NamedTuple
from urllib.parse import quote

from s3cache.errors import UnsafeKey

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
        """The identity: the raw key, never decoded again (``from_identity``)."""
        return f"s3://{self.bucket}/{self.key}"

    @property
    def display(self) -> str:
        """The form users see and paste back: the key percent-encoded as in a manifest (``format_uri``)."""
        return f"s3://{self.bucket}/{encode_key(self.key)}"

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


# What needs quoting in a displayed key: the same test as catalog.format_entry (the manifest writer).
# C1 controls and the invisible or direction-changing format characters (zero-width, bidi overrides and
# isolates, BOM) are quoted too: printed raw they reorder or hide what a terminal shows.
INVISIBLE = "\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
_NEEDS_QUOTING = re.compile(f"[%#\\s\x00-\x1f{INVISIBLE}]")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def encode_key(key: str) -> str:
    """``key`` as a manifest line writes it: unchanged unless it holds '%', '#', white space or a
    control character; then percent-encoded as a whole (``quote(key, safe="/")``)."""
    if _NEEDS_QUOTING.search(key):  # most keys need no quoting, and quote() is the slow part
        return quote(key, safe="/")
    return key


def decode_key(text: str) -> str:
    """A key as users write it to the raw key: each ``%XX`` (two hex digits) is that byte; any other
    '%' is itself. The bytes must be UTF-8. Raises UnsafeKey."""
    if "%" not in text:
        return text
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeKey(f"percent-encoded key {text!r} is not valid UTF-8 ({e.reason})") from None


def format_uri(ref: ObjectRef | str) -> str:
    """The displayed form of a ref, or of an identity string (see module doc)."""
    if isinstance(ref, str):
        ref = from_identity(ref)
    return ref.display


def _split(uri: object) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise UnsafeKey(f"not an s3:// URI: {uri!r}")
    bucket, sep, key = uri[5:].partition("/")
    if not sep or not key:
        raise UnsafeKey(f"URI names no object (s3://bucket/key expected): {uri!r}")
    return bucket, key


def parse_uri(uri: str | ObjectRef) -> ObjectRef:
    """``s3://bucket/key`` as a user wrote it (entry points only) to an ObjectRef: the key is
    percent-decoded as in a manifest (``decode_key``). An ObjectRef passes through unchanged."""
    if isinstance(uri, ObjectRef):
        return uri
    bucket, key = _split(uri)
    return make_ref(bucket, decode_key(key))


def from_identity(uri: str | ObjectRef) -> ObjectRef:
    """An identity string (``ObjectRef.uri``: from the wire, the index, the catalog) back to its ref,
    checked but NOT decoded."""
    if isinstance(uri, ObjectRef):
        return uri
    bucket, key = _split(uri)
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
