"""Which checks an object's bytes can be held to, from the manifest and from what S3 says about it.

Pure functions of a manifest ``Entry`` and the headers of a GET or HEAD answer; no I/O. The hashing
itself is ``checksum.py``'s; asking S3 (HEAD, part sizes) is ``s3api.py``'s.

Invariants:

* S3's additional checksums (``x-amz-checksum-*``) are taken only from an answer that covers the whole
  object (``whole=True``): a ranged answer's checksum, where a server sends one, is of the object, but
  AWS sends none on ranged GETs, so nothing may depend on it.
* A checksum S3 sends is read as composite or whole-object by one rule (``part_count``), which
  ``s3cache manifest --checksums`` shares.
* An ETag counts as an MD5 (single-part) or an MD5 of part MD5s (multipart, ``-N``) only when S3 did not
  encrypt with KMS (``aws:kms``, ``aws:kms:dsse``) or a customer key: those ETags are not digests of the
  bytes.
* ``plan`` checks the strongest claim, and the manifest's strongest beside it when the strongest is S3's:
  a manifest claim is never skipped because S3 has a better one.
"""

from __future__ import annotations

import re

from s3cache.manifest.parse import Entry

from .checksum import Expectation, b64_to_hex, strongest

# S3's additional checksums, strongest first: (the botocore field, our method, bytes in a whole-object value).
S3_CHECKSUMS = (("ChecksumSHA512", "s3-sha512", 64), ("ChecksumSHA256", "s3-sha256", 32),
                ("ChecksumSHA1", "s3-sha1", 20), ("ChecksumMD5", "s3-md5", 16),
                ("ChecksumCRC64NVME", "s3-crc64nvme", 8), ("ChecksumCRC32C", "s3-crc32c", 4),
                ("ChecksumCRC32", "s3-crc32", 4), ("ChecksumXXHASH128", "s3-xxhash128", 16),
                ("ChecksumXXHASH3", "s3-xxhash3", 8), ("ChecksumXXHASH64", "s3-xxhash64", 8))
# S3 computes CRC64NVME over the whole object only, multipart uploads included: never a composite.
_NEVER_COMPOSITE = frozenset({"s3-crc64nvme"})
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-(\d+)")
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")


def manifest_expectations(entry: Entry) -> list[Expectation]:
    """The claims the manifest makes about the bytes."""
    exps: list[Expectation] = []
    if entry.sha256:
        exps.append(Expectation("sha256", entry.sha256))
    if entry.md5:
        exps.append(Expectation("md5", entry.md5))
    if entry.crc32c:
        exps.append(Expectation("crc32c", entry.crc32c))
    if entry.crc64nvme:
        exps.append(Expectation("crc64nvme", entry.crc64nvme))
    if entry.crc32:
        exps.append(Expectation("crc32", entry.crc32))
    return exps


def etag_is_digest(resp: dict) -> bool:
    """Whether the answer's ETag may be a digest of the bytes: not under SSE-KMS, DSSE-KMS or SSE-C,
    whose ETags are not MD5s of the bytes."""
    kms = str(resp.get("ServerSideEncryption") or "").startswith("aws:kms")
    return not (resp.get("SSECustomerAlgorithm") or kms)


def part_count(method: str, value: str, etag: str, checksum_type: str | None) -> str:
    """How many parts an S3 checksum value is over ("" when it is of the whole object). The one rule for
    the fetcher and for ``s3cache manifest --checksums``.

    S3 marks a composite value "-N" and says ``x-amz-checksum-type``; servers that omit the type (moto)
    send no "-N" either, so for a multipart object (ETag "-N") a value not declared FULL_OBJECT is taken
    as composite over the ETag's part count, except a CRC64NVME, which is never composite. That reading
    can be wrong (a FULL_OBJECT CRC32 from such a server): ``readings`` gives the other one, which a
    mismatch tries."""
    _, _, parts = value.partition("-")
    if parts or method in _NEVER_COMPOSITE or checksum_type == "FULL_OBJECT":
        return parts
    multipart = _MULTIPART_ETAG.fullmatch(etag or "")
    return multipart.group(1) if multipart else ""


def _claim(method: str, value: str, parts: str) -> Expectation | None:
    try:
        hexed = b64_to_hex(value.partition("-")[0])
    except ValueError:
        return None  # not base64: a claim nothing could be checked against
    return Expectation(method, hexed + (f"-{parts}" if parts else ""))


def s3_expectations(resp: dict, etag: str, whole: bool) -> list[Expectation]:
    """The claims an S3 answer makes about the object's bytes (no part size yet)."""
    exps: list[Expectation] = []
    if whole:
        for header, method, _ in S3_CHECKSUMS:
            value = resp.get(header)
            if value:
                claim = _claim(method, value, part_count(method, value, etag, resp.get("ChecksumType")))
                if claim is not None:
                    exps.append(claim)
    if etag and etag_is_digest(resp):
        if _MD5_ETAG.fullmatch(etag):
            exps.append(Expectation("etag-md5", etag))
        elif _MULTIPART_ETAG.fullmatch(etag):
            exps.append(Expectation("etag-multipart", etag))
    return exps


def readings(resp: dict, etag: str) -> list[Expectation]:
    """Every way a whole answer's claims can be read: each checksum as of the whole object and, for a
    multipart object whose server did not declare the type, as a composite too; and the ETag."""
    out = list(s3_expectations(resp, etag, True))
    multipart = _MULTIPART_ETAG.fullmatch(etag or "")
    declared = resp.get("ChecksumType")
    for header, method, _ in S3_CHECKSUMS:
        value = resp.get(header)
        if not value or "-" in value or declared:
            continue
        for parts in ("", multipart.group(1) if multipart and method not in _NEVER_COMPOSITE else ""):
            claim = _claim(method, value, parts)
            if claim is not None and claim not in out:
                out.append(claim)
    return out


def expectation(entry: Entry, resp: dict, etag: str, whole: bool) -> Expectation | None:
    """The strongest claim about the bytes that is known before reading them (no part size yet)."""
    return strongest(manifest_expectations(entry) + s3_expectations(resp, etag, whole))


def plan(manifest: list[Expectation], s3: list[Expectation]) -> tuple[Expectation | None, tuple[Expectation, ...]]:
    """The check that verifies (the strongest claim) and the claims checked beside it (the manifest's
    strongest, when the strongest is S3's)."""
    primary = strongest(manifest + s3)
    if primary is None or primary.from_manifest:
        return primary, ()
    mine = strongest(manifest)
    return primary, ((mine,) if mine is not None else ())
