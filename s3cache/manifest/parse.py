"""Parse a manifest: one S3 object (or prefix) per line, in the order the daemon should fetch them.

Grammar, one line::

    s3://BUCKET/KEY [FIELD=VALUE ...]   # comment

* ``KEY`` is percent-decoded (UTF-8): write a space as ``%20``, ``#`` as ``%23`` and ``%`` as ``%25``.
  Everything else, including non-ASCII text, may be written as is.
* Fields: ``size=`` (bytes), ``sha256=``, ``md5=``, ``crc32c=``, ``crc64nvme=``, ``crc32=`` (hex, or
  base64 as S3 prints them; ``crc64nvme=`` and ``crc32=`` are S3's and boto3's default checksums),
  ``version=`` (an S3 VersionId to fetch), ``pin=1`` (keep resident; see ``s3cache pin``).
* A URI ending in ``/`` stands for every object under that prefix, in key order (ListObjectsV2).
  Only ``pin=`` may follow a prefix. Listed keys get the same checks as written ones (a bad one is
  skipped and reported), and listed sizes are hints, not expectations. For ``--shard I/N`` each listed
  object is a position of its own (shard.py).
* ``#`` starts a comment; blank lines are ignored.

Every malformed line raises ``ManifestError`` naming the file, the line number and the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple, TextIO

from s3cache.errors import ManifestError, UnsafeKey

from .refs import ObjectRef, check_bucket, check_key

_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_DIGITS = re.compile(r"[0-9]+")
MAX_OBJECT_SIZE = 5 << 40  # S3's largest object: 5 TiB
_DIGEST_BYTES = {"sha256": 32, "md5": 16, "crc32c": 4, "crc64nvme": 8, "crc32": 4}
FIELDS = ("size", "sha256", "md5", "crc32c", "crc64nvme", "crc32", "version", "pin")

log = logging.getLogger("s3cache.manifest")


class Entry(NamedTuple):
    """One object to fetch and what it must look like. Checksums are lower-case hex.

    ``size`` is a hard expectation when the manifest wrote it (``size_is_hint`` False): bytes of another
    size are the wrong object. A size taken from a prefix listing is only a hint (``size_is_hint``
    True): the object may have been rewritten since it was listed, so a fetch that finds another size
    takes S3's size (and re-lists or re-HEADs) instead of failing with SizeMismatch.
    """

    ref: ObjectRef
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    crc32c: str | None = None
    version: str | None = None
    pin: bool = False
    size_is_hint: bool = False
    crc64nvme: str | None = None  # after size_is_hint: lines built positionally stay valid
    crc32: str | None = None

    @property
    def uri(self) -> str:
        return self.ref.uri


class Prefix(NamedTuple):
    """Every object under ``bucket/prefix``, expanded with ListObjectsV2."""

    bucket: str
    prefix: str
    pin: bool = False


class Listed(NamedTuple):
    """One object a listing returned."""

    key: str
    size: int
    etag: str


def _decode_digest(name: str, value: str) -> str:
    """Hex or base64 to lower-case hex, checked for the algorithm's length."""
    want = _DIGEST_BYTES[name]
    if len(value) == 2 * want and _HEX.match(value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != want:
        raise ValueError(f"{name}= must be {2 * want} hex digits or base64 of {want} bytes, got {value!r}")
    return raw.hex()


def _parse_size(text: str) -> int:
    """``size=``: ASCII digits only (str.isdigit would take '²' and '٣'), at most S3's largest object."""
    if len(text) < 13 and text.isascii() and text.isdigit():  # the common case, fast: below 10**12 < 5 TiB
        return int(text)
    if not _DIGITS.fullmatch(text):
        shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
        raise ValueError(f"size= must be a whole number of bytes, got {shown!r}")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_OBJECT_SIZE)) or int(digits) > MAX_OBJECT_SIZE:
        shown = digits if len(digits) <= 40 else f"a number of {len(digits)} digits"
        raise ValueError(f"size= is {shown}, more than S3's largest object ({MAX_OBJECT_SIZE} bytes, 5 TiB)")
    return int(digits)


def _decode_key(text: str) -> str:
    if "%" not in text:
        return text
    if _PCT.search(text):
        raise ValueError("a '%' in a key must be followed by two hex digits (write '%' itself as %25)")
    raw = bytearray()
    i = 0
    data = text.encode("utf-8")
    while i < len(data):
        c = data[i]
        if c == 0x25:  # '%'
            raw.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(c)
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"percent-encoded key is not valid UTF-8 ({e.reason})") from e


def parse_line(text: str) -> Entry | Prefix | None:
    """One manifest line to an Entry, a Prefix, or None for blank and comment lines.

    Raises ValueError with a message fit for the user; ``parse`` adds the file and line.
    """
    body = text.split("#", 1)[0] if "#" in text else text
    words = body.split()
    if not words:
        return None
    uri, fields = words[0], words[1:]
    if not uri.startswith("s3://"):
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    bucket, sep, raw_key = uri[5:].partition("/")
    if not sep:
        raise ValueError(f"expected s3://bucket/key, got {uri!r} (a whole bucket is written s3://{bucket}/)")
    try:
        check_bucket(bucket)
    except UnsafeKey as e:
        raise ValueError(str(e)) from None
    key = _decode_key(raw_key)
    values: dict[str, str] = {}
    for f in fields:
        name, eq, value = f.partition("=")
        if not eq or not value:
            raise ValueError(f"expected NAME=VALUE after the URI, got {f!r}")
        if name not in FIELDS:
            raise ValueError(f"unknown field {name!r} (known: {', '.join(FIELDS)})")
        if name in values:
            raise ValueError(f"field {name!r} given twice")
        values[name] = value
    pin = values.pop("pin", "0")
    if pin not in ("0", "1"):
        raise ValueError(f"pin= must be 0 or 1, got {pin!r}")
    if key == "" or key.endswith("/"):
        if values:
            raise ValueError(f"a prefix line takes only pin=, not {', '.join(sorted(values))}")
        return Prefix(bucket, key, pin == "1")
    try:
        check_key(key)
    except UnsafeKey as e:
        raise ValueError(str(e)) from None
    size = None
    if "size" in values:
        size = _parse_size(values["size"])
    if len(values) <= ("size" in values):  # nothing but a size (the common line): no digests to decode
        return Entry(ObjectRef(bucket, key), size, None, None, None, None, pin == "1")
    digests = {n: _decode_digest(n, values[n]) for n in _DIGEST_BYTES if n in values}
    return Entry(ObjectRef(bucket, key), size, version=values.get("version"), pin=pin == "1", **digests)


def parse(lines: Iterable[str], path: str = "<manifest>") -> Iterator[Entry | Prefix]:
    """Entries and prefixes in file order. Raises ManifestError at the first bad line."""
    for lineno, text in enumerate(lines, 1):
        try:
            item = parse_line(text)
        except ValueError as e:
            raise ManifestError(path, lineno, str(e)) from None
        if item is not None:
            yield item


def read(path: str) -> Iterator[Entry | Prefix]:
    """Parse the manifest file at ``path`` (UTF-8; a leading byte-order mark is allowed).

    A file that cannot be opened is a ManifestError without a line; a byte that is not UTF-8 is one
    on the line that holds it.
    """
    try:
        f = open(path, encoding="utf-8-sig", newline=None)
    except OSError as e:
        raise ManifestError(path, None, f"cannot read manifest: {e.strerror}") from None
    with f:
        yield from read_open(f, path)


def read_open(f: TextIO, path: str) -> Iterator[Entry | Prefix]:
    """Parse an already open manifest (text mode, UTF-8) named ``path`` in messages."""
    try:
        yield from parse(f, path)
    except UnicodeDecodeError as e:
        # The decoder works in chunks, so its offset does not say which line: find it again.
        lineno, col = _first_undecodable(f.buffer)
        where = f": byte {col + 1} of the line" if lineno is not None else ""
        raise ManifestError(path, lineno, f"not UTF-8 text{where} ({e.reason})") from None
    except OSError as e:
        raise ManifestError(path, None, f"cannot read manifest: {e.strerror}") from None


def _first_undecodable(binary: BinaryIO) -> tuple[int | None, int]:
    """The 1-based line and 0-based byte column of the first bytes that are not UTF-8 (None if unknown).

    Lines are split as text mode splits them (LF, CR LF, CR): latin-1 decodes every byte, and a UTF-8
    sequence never contains the bytes of CR or LF, so the lines are the same ones UTF-8 would give.
    """
    try:
        binary.seek(0)  # the same open file: its name may point elsewhere by now
    except (OSError, ValueError):
        return None, 0
    text = io.TextIOWrapper(binary, encoding="latin-1", newline=None)
    try:
        for lineno, line in enumerate(text, 1):
            try:
                line.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, e.start
    finally:
        text.detach()  # leave the file to its owner
    return None, 0  # the file changed since


Lister = Callable[[str, str], Iterable[Listed]]


class Skipped(NamedTuple):
    """A listed object left out of the manifest, and why. ``uri`` is escaped and shortened for display
    (it came from a listing, so it may hold control characters or be a kilobyte long)."""

    uri: str
    reason: str


class SkipLog:
    """Listed objects that failed the checks manifest keys get, for the log and for ``status``.

    Invariant: ``count`` is every skip seen; ``items`` holds the first ``keep`` of them, so a hostile
    listing of a million bad keys costs a counter, not a million records. Each skip is logged once (the
    first ``log_first``, then one line with the count at ``close``).
    """

    def __init__(self, keep: int = 100, log_first: int = 10) -> None:
        self.items: list[Skipped] = []
        self.count = 0
        self._keep = keep
        self._log_first = log_first

    def add(self, bucket: str, key: str, reason: str) -> None:
        self.count += 1
        if len(self.items) < self._keep:
            self.items.append(Skipped(shown_uri(bucket, key), reason))
        if self.count <= self._log_first:
            log.warning("skipping listed object %s: %s", shown_uri(bucket, key), reason)

    def close(self) -> None:
        if self._log_first and self.count > self._log_first:
            log.warning("skipped %d listed object(s) in all (the first %d are logged above)",
                        self.count, self._log_first)


def shown_uri(bucket: str, key: str, limit: int = 200) -> str:
    """``s3://bucket/key`` fit for one log line: control characters escaped, long keys shortened."""
    text = repr(key)[1:-1] if not key.isprintable() else key
    if len(text) > limit:
        text = f"{text[:limit]}...({len(key.encode('utf-8', 'surrogatepass'))} bytes)"
    return f"s3://{bucket}/{text}"


def _listed_problem(prefix: str, obj: Listed) -> str | None:
    """Why a listed object cannot be an entry (the checks a manifest key gets, and a sane size)."""
    if not isinstance(obj.key, str) or not obj.key.startswith(prefix):
        return f"the listing of {prefix!r} returned a key outside that prefix"
    try:
        check_key(obj.key)
    except UnsafeKey as e:
        return str(e) if len(str(e)) <= 120 else str(e).split(":")[0]
    if not isinstance(obj.size, int) or not 0 <= obj.size <= MAX_OBJECT_SIZE:
        return f"the listing gives size {obj.size!r}, not between 0 and {MAX_OBJECT_SIZE} bytes"
    return None


def expand(items: Iterable[Entry | Prefix], lister: Lister, skipped: SkipLog | None = None) -> Iterator[Entry]:
    """Entries in manifest order with each prefix replaced by its listing (in key order).

    ``lister(bucket, prefix)`` yields the objects under a prefix. A listed key gets the checks a manifest
    key gets (S3 refuses such keys, but moto and some S3-compatible stores list them): one that fails is
    left out and recorded in ``skipped`` (logged once), never passed on to fail later where nobody
    catches it. A listed size is a hint (``Entry.size_is_hint``). Duplicates are left in; the catalog
    collapses them to the first occurrence because it can compare keys without holding a second copy.
    """
    skips = skipped if skipped is not None else SkipLog()
    for item in items:
        if isinstance(item, Entry):
            yield item
            continue
        for obj in lister(item.bucket, item.prefix):
            if isinstance(obj.key, str) and obj.key.endswith("/") and obj.key.startswith(item.prefix):
                continue  # "folder" marker objects carry no data
            problem = _listed_problem(item.prefix, obj)
            if problem is not None:
                skips.add(item.bucket, str(obj.key), problem)
                continue
            yield Entry(ObjectRef(item.bucket, obj.key), obj.size, pin=item.pin, size_is_hint=True)
    skips.close()
