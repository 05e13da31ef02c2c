"""Streaming checksums: what an object's bytes must hash to, and checking that they do.

An ``Expectation`` is one claim about the bytes (a manifest SHA-256, an ETag that is an MD5, ...). The
fetcher picks the strongest claim available and checks it, and the manifest's claim as well when the
strongest is S3's; the size is always checked as well.
Beside it, every file gets a local CRC32C (hardware-accelerated, tens of GB/s) recorded in the index, so that
``s3cache verify`` can re-check files on disk cheaply. CRCs of parallel parts join into the whole
object's (SplitDigest), so an object checked by a CRC is never read twice.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import zlib
from typing import BinaryIO, NamedTuple

import xxhash

from s3cache.errors import ChecksumMismatch

CHUNK = 1 << 20  # bytes read or hashed at a time: memory stays flat whatever the object size

# Preferred first: cryptographic digests (they catch any change, a wrong object included), then
# whole-object CRCs (they catch transfer errors and are checked as the parts stream, with no second read
# of the file), then S3's XXHASH digests (fast, but they need the bytes in order), then ETags (an MD5
# that needs the bytes in order). Of two claims of one kind the
# manifest's comes first: it also says which content the user expects. "etag-md5" is the ETag of a
# single-part upload; "etag-multipart" is the MD5 of the part MD5s (needs the part sizes); "size" alone
# proves little: the fetcher warns about it and can refuse it.
METHODS = (
    "sha256",
    "s3-sha512",
    "s3-sha256",
    "s3-sha1",
    "md5",
    "s3-md5",
    "crc64nvme",
    "s3-crc64nvme",
    "crc32c",
    "s3-crc32c",
    "crc32",
    "s3-crc32",
    "s3-xxhash128",
    "s3-xxhash3",
    "s3-xxhash64",
    "etag-md5",
    "etag-multipart",
    "size",
)
MANIFEST_METHODS = frozenset({"sha256", "md5", "crc32c", "crc64nvme", "crc32"})


class Expectation(NamedTuple):
    """One claim about the bytes. ``value`` is lower-case hex; a multipart ETag or a COMPOSITE S3
    checksum is ``hex-N`` and needs the upload's part boundaries: ``part_sizes`` when its parts differ,
    else ``part_size`` for all but a shorter last one (from ``HeadObject(PartNumber=k)``)."""

    method: str
    value: str
    part_size: int = 0
    part_sizes: tuple[int, ...] = ()

    @property
    def from_manifest(self) -> bool:
        return self.method in MANIFEST_METHODS


def strongest(expectations: list[Expectation]) -> Expectation | None:
    usable = [e for e in expectations if e.method != "size"]
    return min(usable, key=lambda e: METHODS.index(e.method)) if usable else None


def b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


class _Crc:
    """A CRC with hashlib's interface. ``value`` is the running CRC, which SplitDigest joins."""

    width = 4  # bytes in the digest

    def __init__(self) -> None:
        self.value = 0

    @staticmethod
    def _fn(data: bytes | memoryview, value: int) -> int:
        raise NotImplementedError

    def update(self, data: bytes | memoryview) -> None:
        self.value = self._fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self.width, "big")

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> _Crc:
        return copy.copy(self)


def _crc32c_fn():
    """awscrt's CRC32C: ~0.015 CPU-s per GB here against 0.04 for the crc32c package, and already loaded
    by botocore's signer, where importing the crc32c package cost ~30 ms of every daemon start (it reads
    its own version through importlib.metadata). The package stays the fallback without awscrt."""
    try:
        from awscrt.checksums import crc32c
    except ImportError:
        from crc32c import crc32c
    return crc32c


class _Crc32c(_Crc):
    _fn = staticmethod(_crc32c_fn())


def _crc32_fn():
    """ISA-L's CRC32 (the ``isal`` package) when installed: ~0.012 CPU-s per GB here against zlib's 0.21,
    which was a tenth of the daemon's CPU on a large object checked by S3's CRC32 (boto3's default).
    The same values as zlib's (a drop-in); zlib stays the fallback."""
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        return zlib.crc32
    return crc32


class _Crc32(_Crc):
    _fn = staticmethod(_crc32_fn())


class _PerPart:
    """A checksum of the concatenated per-part checksums, then ``-N``: S3's multipart ETag (MD5 of the
    part MD5s) and its COMPOSITE additional checksums (e.g. CRC32 of the part CRC32s) are both this."""

    def __init__(self, make, part_size: int, part_sizes: tuple[int, ...] = ()) -> None:
        self.make = make
        self.part_size = part_size
        self.part_sizes = part_sizes  # the real boundaries, when the upload's parts differ
        self.parts: list[bytes] = []
        self.current = make()
        self.filled = 0

    def _size(self) -> int:
        k = len(self.parts)
        if self.part_sizes:
            # Bytes past the last declared part go to one more part: the check then fails on its count.
            return self.part_sizes[k] if k < len(self.part_sizes) else 1 << 62
        return self.part_size

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            size = self._size()
            take = min(len(view), size - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == size:
                self.parts.append(self.current.digest())
                self.current, self.filled = self.make(), 0

    def copy(self) -> _PerPart:
        other = copy.copy(self)
        other.parts = list(self.parts)
        other.current = self.current.copy()
        return other

    def hexdigest(self) -> str:
        parts = list(self.parts)
        if self.filled or not parts:
            parts.append(self.current.digest())
        # Declared parts of 0 bytes after the last byte (an upload whose last part is empty) are parts too.
        empty = self.make().digest()
        parts += [empty for size in self.part_sizes[len(parts):] if size == 0]
        whole = self.make()
        whole.update(b"".join(parts))
        return f"{whole.hexdigest()}-{len(parts)}"


class _Crc64nvme(_Crc):
    """CRC64NVME (S3's default for new uploads) through awscrt, a core dependency: without it an object
    whose only checksum is a CRC64NVME could be checked by its size alone (the fetcher refuses to start)."""

    width = 8

    def __init__(self) -> None:
        from awscrt.checksums import crc64nvme

        super().__init__()
        self._fn = crc64nvme


def have_crc64nvme() -> bool:
    try:
        import awscrt.checksums  # noqa: F401
    except ImportError:
        return False
    return True


class _Combiner:
    """Joins reflected CRCs of consecutive byte ranges: crc(A + B) from crc(A), crc(B) and len(B).

    What lets parallel ranged parts be checked as they stream, with no second pass over the file. This
    is zlib's crc32_combine (multiplication by x^(8n) modulo the polynomial, from a table of x^(2^k)),
    for any width; it holds for CRCs whose init and final xor are all ones, as S3's CRC32, CRC32C and
    CRC64NVME are.
    """

    def __init__(self, poly: int, width: int) -> None:
        self.poly, self.top = poly, 1 << (width - 1)
        self._x2n: list[int] | None = None  # built on first use: ~0.3 ms of Python each, off the start

    @property
    def x2n(self) -> list[int]:
        """x^(2^k) modulo the polynomial, k = 0..63. Two threads may both build it: the same list."""
        if self._x2n is None:
            x2n = [self.top >> 1]  # x^1
            for _ in range(1, 64):
                x2n.append(self._mult(x2n[-1], x2n[-1]))
            self._x2n = x2n
        return self._x2n

    def _mult(self, a: int, b: int) -> int:
        m, p = self.top, 0
        while m:
            if a & m:
                p ^= b
            b = (b >> 1) ^ self.poly if b & 1 else b >> 1
            m >>= 1
        return p

    def combine(self, crc1: int, crc2: int, len2: int) -> int:
        p, k, n, x2n = self.top, 3, len2, self.x2n  # x^0; then x^(8 * len2): k = 3 starts at x^8, one byte
        while n:
            if n & 1:
                p = self._mult(x2n[k % 64], p)
            n >>= 1
            k += 1
        return self._mult(p, crc1) ^ crc2


_CRC32C, _CRC32, _CRC64NVME = (_Combiner(0x82F63B78, 32), _Combiner(0xEDB88320, 32),
                               _Combiner(0x9A6C9329AC4BC9B5, 64))
_COMBINERS = {"crc32c": _CRC32C, "s3-crc32c": _CRC32C, "s3-crc32": _CRC32, "crc32": _CRC32,
              "s3-crc64nvme": _CRC64NVME, "crc64nvme": _CRC64NVME}
_LOCAL = _COMBINERS["crc32c"]


_MAKERS = {
    "s3-crc64nvme": _Crc64nvme, "crc64nvme": _Crc64nvme,
    "sha256": hashlib.sha256, "s3-sha256": hashlib.sha256,
    "md5": hashlib.md5, "etag-md5": hashlib.md5, "etag-multipart": hashlib.md5,
    "s3-sha1": hashlib.sha1,
    "s3-sha512": hashlib.sha512, "s3-md5": hashlib.md5,
    # S3's XXHASH checksums are the canonical (big-endian) XXH64, XXH3-64 and XXH3-128 with seed 0.
    "s3-xxhash64": xxhash.xxh64, "s3-xxhash3": xxhash.xxh3_64, "s3-xxhash128": xxhash.xxh3_128,
    "crc32c": _Crc32c, "s3-crc32c": _Crc32c,
    "s3-crc32": _Crc32, "crc32": _Crc32,
}


def _hasher(exp: Expectation):
    make = _MAKERS.get(exp.method)
    if make is None:
        raise ValueError(f"no hasher for {exp.method}")
    if is_per_part(exp):
        if not exp.part_size and not exp.part_sizes:
            raise ValueError(f"{exp.method} {exp.value} needs the part size")
        return _PerPart(make, exp.part_size, exp.part_sizes)
    return make()


def describe_mismatch(exp: Expectation, actual: str) -> str:
    """"md5 is X, expected Y", with base64 beside the hex for whole-object digests: a manifest may give
    md5=/sha256=/crc32c= in either form (S3 prints base64), and users look for the one they wrote."""
    text = f"{exp.method} is {actual}, expected {exp.value}"
    try:
        if not is_per_part(exp) and len(exp.value) % 2 == 0:
            b64 = lambda h: base64.b64encode(bytes.fromhex(h)).decode()  # noqa: E731
            text = (f"{exp.method} is {actual} (base64 {b64(actual)}), expected {exp.value} "
                    f"(base64 {b64(exp.value)})")
    except ValueError:
        pass
    return text


def is_per_part(exp: Expectation) -> bool:
    """True for multipart ETags and composite checksums, whose value ends in ``-N``."""
    return exp.method == "etag-multipart" or "-" in exp.value


class DigestMismatch(ChecksumMismatch):
    """The bytes do not match one or more of the claims checked. ``failed`` and ``passed`` list
    ``(expectation, actual hex)``: what lets the fetcher tell a wrong claim from a transfer error."""

    def __init__(self, what: str, failed: list[tuple[Expectation, str]],
                 passed: list[tuple[Expectation, str]]) -> None:
        self.failed = failed
        self.passed = passed
        text = "; ".join(describe_mismatch(e, actual) for e, actual in failed)
        super().__init__(f"{what}: {text}")


class Digest:
    """Feeds bytes, in order, to the hashers of the expectations and to the local CRC32C.

    ``expect`` is the check that verifies (its method is what ``check`` returns); ``also`` are claims
    checked beside it (the manifest's, when the strongest claim is S3's)."""

    def __init__(self, expect: Expectation | None, also: tuple[Expectation, ...] = ()) -> None:
        self.expect = expect
        self.expects = ([expect] if expect is not None else []) + [e for e in also if e != expect]
        self._remotes = [_hasher(e) for e in self.expects]
        self._local = _Crc32c()
        self.nbytes = 0

    def update(self, data: bytes | memoryview) -> None:
        for r in self._remotes:
            r.update(data)
        self._local.update(data)
        self.nbytes += len(data)

    @property
    def local_crc32c(self) -> str:
        return self._local.hexdigest()

    def copy(self) -> Digest:
        """An independent copy of the running state (to go back to if an attempt fails)."""
        other = copy.copy(self)
        other._remotes = [r.copy() for r in self._remotes]
        other._local = self._local.copy()
        return other

    def actual(self) -> list[tuple[Expectation, str]]:
        """Each expectation with what the bytes hashed to."""
        return [(e, r.hexdigest()) for e, r in zip(self.expects, self._remotes)]

    def check(self, what: str, size: int | None) -> str:
        """Raise ChecksumMismatch unless size and every expectation hold; return the method that verified."""
        if size is not None and self.nbytes != size:
            raise ChecksumMismatch(f"{what}: got {self.nbytes} bytes, expected {size}")
        if self.expect is None:
            return "size"
        results = self.actual()
        failed = [(e, a) for e, a in results if a != e.value]
        if failed:
            raise DigestMismatch(what, failed, [(e, a) for e, a in results if a == e.value])
        return self.expect.method


def digest_file(f: BinaryIO, expect: Expectation | None, also: tuple[Expectation, ...] = ()) -> Digest:
    """Read an open file from the start through a Digest, one chunk at a time (memory stays flat)."""
    d = Digest(expect, also)
    f.seek(0)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)
        if not n:
            return d
        d.update(view[:n])


def local_crc32c_of(path: str) -> str:
    with open(path, "rb") as f:
        return digest_file(f, None).local_crc32c
