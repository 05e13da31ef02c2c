"""Settling which checks one download is held to, and judging a mismatch: a transfer error (fetch again)
or a wrong claim (fail for good).

Invariants:

* Nothing is checked by its size alone while S3 or the manifest has a checksum for it: when the first
  answer carries no usable check (AWS sends no ``x-amz-checksum-*`` on ranged GETs; an SSE-KMS ETag is
  not an MD5), S3 is asked with ``HeadObject(ChecksumMode=ENABLED)`` before anything is published.
* With ``require_checksum`` an object with nothing stronger than its size fails with ``NoChecksum`` before
  its bytes are read; without it, it is published as ``size`` and logged at warning once per object.
* A mismatch becomes ``WrongChecksum`` (permanent) only when the bytes are known good: S3's own checksum
  agrees with them and only the manifest's claim fails, or ``STABLE_REPEATS`` (3) downloads hashed to the
  same wrong value. Any other mismatch stays a ``ChecksumMismatch``, which the retry policy retries.
  Three, not two: a flipped byte in a small object lands on the same offset twice often enough to
  matter (1 in 700 for a 700-byte object), and that must never fail an object for good.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

from s3cache.errors import NoChecksum, ObjectChanged, WrongChecksum
from s3cache.manifest.parse import Entry

from .checks import manifest_expectations, plan, s3_expectations
from .checksum import Digest, DigestMismatch, Expectation, describe_mismatch, digest_file, is_per_part, strongest
from .s3api import ObjectApi

# Downloads that must hash to the same wrong digest before a mismatch is taken for a wrong claim.
STABLE_REPEATS = 3

log = logging.getLogger("s3cache.fetch")


class Checks(NamedTuple):
    """What one download is checked against: ``expect`` verifies (None: the size alone), ``also`` beside it."""

    expect: Expectation | None
    also: tuple[Expectation, ...] = ()
    spare: Expectation | None = None  # S3's strongest claim when not checked: consulted on a mismatch


class Verifier:
    """One per fetcher; keeps the module's invariants. ``_warned`` (under ``_lock``) holds each URI warned
    about as size-only, so the warning is logged once per object per daemon run."""

    def __init__(self, api: ObjectApi, require_checksum: bool = False) -> None:
        self.api = api
        self.require_checksum = require_checksum
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def settle(self, entry: Entry, resp: dict, etag: str, whole: bool, total: int) -> Checks:
        """The checks for a download whose first answer was ``resp``; ``whole`` if it carried the whole
        object. May HEAD the object (and its parts); raises NoChecksum under ``require_checksum``."""
        manifest = manifest_expectations(entry)
        s3 = s3_expectations(resp, etag, whole)
        expect, also = plan(manifest, s3)
        # No check at all: ask S3 for its checksums. For an object in parts (whose first, ranged answer
        # carries no whole-object checksum) ask too unless the check is already the strongest kind: the
        # HEAD runs while the parts' GETs are on their way. (A whole first answer with a manifest claim
        # is not held up by a HEAD: S3's claim is asked for only if the manifest's fails.)
        if expect is None or (not whole and expect.method != "sha256"):
            now, theirs = self.api.s3_check(entry, total)
            if now != etag:
                raise ObjectChanged(f"{entry.uri} changed in S3 during the download")
            if theirs is not None:
                expect, also = plan(manifest, s3 + [theirs])
        expect = self.api.with_part_size(entry, expect, total)
        if expect is None and self.require_checksum:
            raise NoChecksum(entry.uri)
        spare = strongest(s3) if expect is not None and expect.from_manifest else None
        return Checks(expect, also, spare)

    def verify(self, entry: Entry, etag: str, total: int, checks: Checks, digest: Digest, fd: int,
               seen: dict) -> str:
        """Check ``digest`` (of the file open at ``fd``) and return the method that verified it.

        ``seen`` carries the wrong digests of earlier attempts at this object, across attempts."""
        uri = entry.uri
        try:
            method = digest.check(uri, total)
        except DigestMismatch as e:
            self._judge(entry, etag, checks, e, fd, seen)
            raise
        if method == "size":
            with self._lock:
                first = uri not in self._warned
                self._warned.add(uri)
            if first:
                log.warning("%s is verified by its size alone: S3 has no checksum for it and its ETag is not "
                            "an MD5; add sha256= to its manifest line, or upload it with a checksum "
                            "(boto3 adds a CRC by default), to have its bytes checked", uri)
        return method

    def _judge(self, entry: Entry, etag: str, checks: Checks, e: DigestMismatch, fd: int, seen: dict) -> None:
        """Raise WrongChecksum if the mismatch is not a transfer error; return if it may be one."""
        uri = entry.uri
        wrong = "; ".join(describe_mismatch(x, actual) for x, actual in e.failed)
        if all(x.from_manifest for x, _ in e.failed):
            agrees = [x for x, _ in e.passed if not x.from_manifest]
            if not agrees and not any(not x.from_manifest for x, _ in e.failed):
                # Only the manifest's claim was checked: does S3 vouch for these bytes?
                now, theirs = etag, checks.spare
                if theirs is None or is_per_part(theirs):
                    now, theirs = self.api.s3_check(entry, os.fstat(fd).st_size)
                if now == etag and theirs is not None:
                    with os.fdopen(os.dup(fd), "rb") as f:
                        s3_says = digest_file(f, theirs)
                    if s3_says.actual()[0][1] == theirs.value:
                        agrees = [theirs]
            if agrees:
                raise WrongChecksum(uri, f"{wrong}, while S3's own {agrees[0].method} agrees with the bytes: "
                                         f"the manifest's checksum is wrong") from e
        key = frozenset(e.failed)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= STABLE_REPEATS:
            raise WrongChecksum(uri, f"{wrong}, for the same bytes in {STABLE_REPEATS} downloads: not a transfer "
                                     f"error") from e
