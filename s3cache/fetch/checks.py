"""Which checks an object's bytes can be held to, from the manifest and from what S3 says about it.

Pure functions of a manifest ``Entry`` and the headers of a GET or HEAD answer; no I/O. The hashing
itself is ``checksum.py``'s; asking S3 (HEAD, part sizes) is ``s3api.py``'s.

Invariants:

* S3's additional checksums (``x-amz-checksum-*``) are taken only from an answer that covers the whole
  object (``whole=True``): a ranged answer's checksum, where a server sends one, is of the object, but
  AWS sends none on ranged GETs, so nothing may depend on it.
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

S3_CHECKSUMS = (("ChecksumSHA256", "s3-sha256"), ("ChecksumSHA1", "s3-sha1"),
                ("ChecksumCRC64NVME", "s3-crc64nvme"), ("ChecksumCRC32C", "s3-crc32c"),
                ("ChecksumCRC32", "s3-crc32"))
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
    return exps


def s3_expectations(resp: dict, etag: str, whole: bool) -> list[Expectation]:
    """The claims an S3 answer makes about the object's bytes (no part size yet)."""
    exps: list[Expectation] = []
    multipart = _MULTIPART_ETAG.fullmatch(etag or "")
    if whole:
        for header, method in S3_CHECKSUMS:
            value = resp.get(header)
            if not value:
                continue
            b64, _, parts = value.partition("-")
            # S3 marks composite checksums "-N"; moto does not, so for a multipart object anything not
            # declared FULL_OBJECT is taken as composite over the ETag's part count.
            if not parts and multipart and resp.get("ChecksumType") != "FULL_OBJECT":
                parts = multipart.group(1)
            exps.append(Expectation(method, b64_to_hex(b64) + (f"-{parts}" if parts else "")))
    encrypted = resp.get("SSECustomerAlgorithm") or (resp.get("ServerSideEncryption") or "").startswith("aws:kms")
    if etag and not encrypted:  # with SSE-KMS, DSSE-KMS or SSE-C the ETag is not an MD5 of the bytes
        if _MD5_ETAG.fullmatch(etag):
            exps.append(Expectation("etag-md5", etag))
        elif multipart:
            exps.append(Expectation("etag-multipart", etag))
    return exps


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
