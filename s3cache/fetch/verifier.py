"""Settling which checks one download is held to, and judging a mismatch: a transfer error (fetch again)
or a wrong claim (fail for good).

Invariants:

* Nothing is checked by its size alone while S3 or the manifest has a checksum for it: when the first
  answer carries no usable check (AWS sends no ``x-amz-checksum-*`` on ranged GETs; an SSE-KMS ETag is
  not an MD5), S3 is asked with ``HeadObject(ChecksumMode=ENABLED)`` before anything is published.
* With ``require_checksum`` an object with nothing stronger than its size fails with ``NoChecksum`` before
  its bytes are read; without it, it is published as ``size`` and logged at warning once per object.
* Every size an answer states is the size S3's HEAD gives whenever a HEAD is made, and one is made
  whenever nothing but a HEAD can tell a short body from the object (a size-only check, a ``200`` to a
  ranged GET, a size other than the manifest's).
* A mismatch becomes ``WrongChecksum`` (permanent) only when the bytes are known good: another claim (S3's
  own, under every reading) agrees with them and the manifest's fails, or ``STABLE_REPEATS`` (3) downloads
  hashed to the same wrong value. When another claim agrees and only S3's failed, the object is
  published under the one that agrees; when only the ETag keeps failing, under its size alone. Any other
  mismatch stays a ``ChecksumMismatch``, which the retry policy retries.
  Three, not two: a flipped byte in a small object lands on the same offset twice often enough to
  matter (1 in 700 for a 700-byte object), and that must never fail an object for good.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple, NoReturn

from s3cache.errors import FetchFailed, NoChecksum, ObjectChanged, WrongChecksum
from s3cache.manifest.parse import Entry

from .checks import manifest_expectations, plan, readings, s3_expectations
from .checksum import (
    METHODS,
    Digest,
    DigestMismatch,
    Expectation,
    describe_mismatch,
    digest_file,
    is_per_part,
)
from .retry import BadResponse
from .s3api import ObjectApi

# Downloads that must hash to the same wrong digest before a mismatch is taken for a wrong claim.
STABLE_REPEATS = 3

log = logging.getLogger("s3cache.fetch")


class Checks(NamedTuple):
    """What one download is checked against: ``expect`` verifies (None: the size alone), ``also`` beside it."""

    expect: Expectation | None
    also: tuple[Expectation, ...] = ()
    claims: tuple[Expectation, ...] = ()  # every reading of S3's claims (unchecked ones are tried on a mismatch)


_ETAGS = frozenset({"etag-md5", "etag-multipart"})


class Verifier:
    """One per fetcher; keeps the module's invariants. ``_warned`` (under ``_lock``) holds each URI warned
    about as size-only, so the warning is logged once per object per daemon run."""

    def __init__(self, api: ObjectApi, require_checksum: bool = False) -> None:
        self.api = api
        self.require_checksum = require_checksum
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def head(self, entry: Entry, etag: str) -> dict:
        """HEAD the object (with its checksums); ObjectChanged unless it still has ``etag``."""
        head = self.api.head(entry)
        if head.get("ETag", "").strip('"') != etag:
            raise ObjectChanged(f"{entry.uri} changed in S3 during the download")
        return head

    def size_mismatch(self, entry: Entry, etag: str, total: int) -> NoReturn:
        """An answer gave a size other than the manifest's: FetchFailed (for good) if S3's HEAD agrees
        with the answer, BadResponse (retried) if it agrees with the manifest. One wrong Content-Range
        must not fail an object for good, where a checksum mismatch needs three identical downloads."""
        size = int(self.head(entry, etag).get("ContentLength", -1))
        if size == entry.size:
            raise BadResponse(f"{entry.uri}: an answer says {total} bytes; S3's HEAD says {size}, as the "
                              f"manifest does")
        raise FetchFailed(entry.uri, "SizeMismatch", f"S3 says {size} bytes, the manifest says {entry.size}")

    def settle(self, entry: Entry, resp: dict, etag: str, whole: bool, total: int, confirm: bool = False) -> Checks:
        """The checks for a download whose first answer was ``resp``; ``whole`` if it carried the whole
        object. May HEAD the object (and its parts); raises NoChecksum under ``require_checksum``.

        Whenever it HEADs, the HEAD's size must be ``total`` (else BadResponse: an answer misstated the
        size); ``confirm`` makes it HEAD even when the first answer carries a check (a ``200`` to a ranged
        GET, or a size other than the manifest's hint: only the HEAD can say the body is the object)."""
        manifest = manifest_expectations(entry)
        s3 = s3_expectations(resp, etag, whole)
        expect, also = plan(manifest, s3)
        # No check at all: ask S3 for its checksums. For an object in parts (whose first, ranged answer
        # carries no whole-object checksum) ask too unless the check is already the strongest kind: the
        # HEAD runs while the parts' GETs are on their way. (A whole first answer with a manifest claim
        # is not held up by a HEAD: S3's claim is asked for only if the manifest's fails.)
        claims = readings(resp, etag) if whole else list(s3)
        headed = expect is None or (not whole and expect.method != "sha256") or confirm
        if headed:
            self._ask(entry, etag, total, s3, claims)
        expect, also = self.api.checkable(entry, manifest, s3, total)
        if expect is None and not headed:  # its per-part claims could not be checked: only the size is left
            self._ask(entry, etag, total, s3, claims)
            expect, also = self.api.checkable(entry, manifest, [c for c in s3 if not is_per_part(c)], total)
        if expect is None and self.require_checksum:
            raise NoChecksum(entry.uri)
        return Checks(expect, also, tuple(claims))

    def _ask(self, entry: Entry, etag: str, total: int, s3: list[Expectation], claims: list[Expectation]) -> None:
        """HEAD the object: its size must be ``total``; its claims are added to ``s3`` and their readings
        to ``claims``."""
        head = self.head(entry, etag)
        if int(head.get("ContentLength", -1)) != total:
            raise BadResponse(f"{entry.uri}: an answer to a GET says the object is {total} bytes, a HEAD "
                              f"says {head.get('ContentLength')}")
        s3 += [c for c in s3_expectations(head, etag, True) if c not in s3]
        claims += [c for c in readings(head, etag) if c not in claims]

    def verify(self, entry: Entry, etag: str, total: int, checks: Checks, digest: Digest, fd: int,
               seen: dict) -> str:
        """Check ``digest`` (of the file open at ``fd``) and return the method that verified it.

        ``seen`` carries the wrong digests of earlier attempts at this object, across attempts."""
        uri = entry.uri
        try:
            method = digest.check(uri, total)
        except DigestMismatch as e:
            method = self._judge(entry, etag, checks, e, fd, seen)
            if method is None:
                raise
        if method == "size":
            self._warn_size_only(uri)
        return method

    def _warn_size_only(self, uri: str) -> None:
        with self._lock:
            first = uri not in self._warned
            self._warned.add(uri)
        if first:
            log.warning("%s is verified by its size alone: S3 has no checksum for it that can be checked and "
                        "its ETag is not an MD5; add sha256= to its manifest line, or upload it with a "
                        "checksum (boto3 adds a CRC by default), to have its bytes checked", uri)

    def _others(self, entry: Entry, etag: str, checks: Checks, checked: list[Expectation],
                fd: int) -> list[Expectation]:
        """S3's claims not yet checked that agree with the file's bytes, strongest first. Those the answers
        already made are tried first; if none agrees, every checksum of a fresh HEAD under both readings
        of its type (``readings``), and the ETag. Only on a mismatch."""
        size = os.fstat(fd).st_size
        done = {(c.method, c.value) for c in checked}
        agree = self._agreeing(entry, [c for c in checks.claims if (c.method, c.value) not in done], size, fd)
        if agree:
            return agree
        done |= {(c.method, c.value) for c in checks.claims}
        head = self.head(entry, etag)
        if int(head.get("ContentLength", -1)) != size:
            raise BadResponse(f"{entry.uri}: the answers gave {size} bytes, a HEAD says {head.get('ContentLength')}")
        return self._agreeing(entry, [c for c in readings(head, etag) if (c.method, c.value) not in done], size, fd)

    def _agreeing(self, entry: Entry, claims: list[Expectation], size: int, fd: int) -> list[Expectation]:
        """Those of ``claims`` the file's bytes match, strongest first (one read of the file)."""
        ready = [r for r in (self.api.with_boundaries(entry, c, size) for c in claims) if r is not None]
        if not ready:
            return []
        with os.fdopen(os.dup(fd), "rb") as f:
            d = digest_file(f, ready[0], tuple(ready[1:]))
        agree = [c for c, actual in d.actual() if actual == c.value]
        return sorted(agree, key=lambda c: METHODS.index(c.method))

    def _judge(self, entry: Entry, etag: str, checks: Checks, e: DigestMismatch, fd: int,
               seen: dict) -> str | None:
        """After a mismatch: the method to publish under when another claim vouches for the bytes; None
        when it may be a transfer error (fetch again); WrongChecksum when it cannot be one.

        The bytes are known good when a claim other than the one that failed agrees with them (S3's
        claims are tried under every reading; a transfer error matches none): a failed manifest claim is
        then wrong (WrongChecksum), a failed S3 claim was misread or is not a digest (a copy's MD5 ETag
        beside a composite checksum, a FULL_OBJECT checksum from a server that does not say so) and the
        object is published under the claim that agrees. Otherwise ``STABLE_REPEATS`` downloads hashing
        to the same wrong value fail it, unless only the ETag disagreed: an ETag that is not an MD5 (Swift,
        S3 directory buckets) leaves the size alone, as for any object without a checksum."""
        uri = entry.uri
        wrong = "; ".join(describe_mismatch(x, actual) for x, actual in e.failed)
        failed_manifest = any(x.from_manifest for x, _ in e.failed)
        passed_manifest = [x for x, _ in e.passed if x.from_manifest]
        s3_agrees = [x for x, _ in e.passed if not x.from_manifest]
        if not s3_agrees and not passed_manifest:
            s3_agrees = self._others(entry, etag, checks, [x for x, _ in e.failed + e.passed], fd)
        if failed_manifest and s3_agrees:
            raise WrongChecksum(uri, f"{wrong}, while S3's own {s3_agrees[0].method} agrees with the bytes: "
                                     f"the manifest's checksum is wrong") from e
        if not failed_manifest and (passed_manifest or s3_agrees):
            winner = (passed_manifest or s3_agrees)[0]
            log.warning("%s: %s, while %s agrees with the bytes: verified by %s", uri, wrong, winner.method,
                        winner.method)
            return winner.method
        key = frozenset(e.failed)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] < STABLE_REPEATS:
            return None
        if not failed_manifest and all(x.method in _ETAGS for x, _ in e.failed):
            log.warning("%s: %s, for the same bytes in %d downloads: its ETag is not an MD5 of the bytes",
                        uri, wrong, STABLE_REPEATS)
            if self.require_checksum:
                raise NoChecksum(uri) from e
            return "size"
        raise WrongChecksum(uri, f"{wrong}, for the same bytes in {STABLE_REPEATS} downloads: not a transfer "
                                 f"error") from e
