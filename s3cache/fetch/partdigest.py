"""Digests of an object fetched in parts, so that the file is never read back whole to verify it.

``SplitDigest``: whole-object CRCs joined from the parts' own CRCs, which may stream in any order.
``InOrderDigest``: a hash that needs the bytes in order (MD5, SHA), fed by the part at the front as it
streams; only bytes that landed ahead of it are read back, and a part attempt cut off mid-stream is taken
back out of the hash. Both give a ``checksum.Digest`` to check.
"""

from __future__ import annotations

import os
import threading

from s3cache.errors import ChecksumMismatch

from .checksum import _COMBINERS, _LOCAL, CHUNK, Digest, Expectation, is_per_part


class SplitDigest:
    """An object's checksums joined from those of its parts, which may stream in any order.

    Only for expectations that are whole-object CRCs, or none (``splittable``): a hash such as MD5
    needs the bytes in order, so those objects are read back once they are whole (``digest_file``).
    """

    def __init__(self, expect: Expectation | None, also: tuple[Expectation, ...] = ()) -> None:
        self.expect = expect
        self.also = also
        self._parts: dict[int, Digest] = {}

    @staticmethod
    def splittable(expect: Expectation | None, also: tuple[Expectation, ...] = ()) -> bool:
        return all(e is None or (e.method in _COMBINERS and not is_per_part(e)) for e in (expect, *also))

    def part(self) -> Digest:
        """A fresh digest for one attempt at one part; hand it to ``done`` once the part is whole."""
        return Digest(self.expect, self.also)

    def done(self, offset: int, d: Digest) -> None:
        self._parts[offset] = d

    def joined(self) -> Digest:
        """The whole object's Digest, ready for ``check``. The parts must cover it from byte 0 on."""
        out = Digest(self.expect, self.also)
        for offset in sorted(self._parts):
            d = self._parts[offset]
            if offset != out.nbytes:
                raise ValueError(f"parts do not meet: one ends at {out.nbytes}, the next starts at {offset}")
            out._local.value = _LOCAL.combine(out._local.value, d._local.value, d.nbytes)
            for e, mine, theirs in zip(out.expects, out._remotes, d._remotes):
                mine.value = _COMBINERS[e.method].combine(mine.value, theirs.value, d.nbytes)
            out.nbytes += d.nbytes
        return out




class InOrderDigest:
    """One Digest fed in byte order from parts that stream in parallel: for hashes such as MD5, which
    cannot be joined from parts the way CRCs are (SplitDigest).

    The *frontier* is the offset up to which the digest has consumed the object. A part streaming at the
    frontier is hashed as its chunks arrive, with no second read; bytes that landed in the file before
    the frontier reached them (parts that finished, or got ahead, out of order) are read back from it
    once, when the frontier gets there. ``readback`` counts those bytes.

    Invariants: the digest has consumed exactly bytes ``[0, frontier)`` of the file, in order, each as
    the attempt that wrote them wrote it; the frontier is inside at most one unfinished part attempt, the
    one whose thread moved it there, and a failed attempt puts the digest and the frontier back to where
    they were before it fed anything (a failed attempt's bytes never stay in the digest: its retry
    writes that range again and is hashed afresh). All under ``_lock``.
    """

    def __init__(self, digest: Digest, fd: int) -> None:
        self.digest = digest
        self.fd = fd
        self.frontier = 0
        self.readback = 0
        self._done: dict[int, int] = {}  # start -> end (exclusive) of finished parts not yet consumed
        self._lock = threading.Lock()

    class Attempt:
        """One attempt at one part, starting at ``start``: pass it to ``Fetcher._stream`` as the digest."""

        __slots__ = ("owner", "start", "offset", "saved")

        def __init__(self, owner: InOrderDigest, start: int) -> None:
            self.owner, self.start, self.offset, self.saved = owner, start, start, None

        def update(self, data: bytes | memoryview) -> None:
            self.owner._chunk(self, data)
            self.offset += len(data)

    def attempt(self, start: int) -> InOrderDigest.Attempt:
        return InOrderDigest.Attempt(self, start)

    def _read_into_digest(self, end: int) -> None:
        """Hash the file's bytes ``[frontier, end)`` (lock held)."""
        while self.frontier < end:
            data = os.pread(self.fd, min(CHUNK, end - self.frontier), self.frontier)
            if not data:
                raise ChecksumMismatch(f"the temp file ends at {self.frontier}, before {end}")
            self.digest.update(data)
            self.readback += len(data)
            self.frontier += len(data)

    def _chunk(self, a: InOrderDigest.Attempt, data: bytes | memoryview) -> None:
        """``data`` was just written at ``a.offset``; hash it now if the frontier has reached it."""
        with self._lock:
            if not (a.start <= self.frontier <= a.offset):
                return  # the frontier is behind this part: it reads this part back when it gets here
            if a.saved is None:
                a.saved = (self.digest.copy(), self.frontier, self.readback)
            self._read_into_digest(a.offset)  # what this attempt wrote before the frontier reached it
            self.digest.update(data)
            self.frontier += len(data)

    def failed(self, a: InOrderDigest.Attempt) -> None:
        """The attempt failed: forget what it fed."""
        with self._lock:
            if a.saved is not None:
                self.digest, self.frontier, self.readback = a.saved
                a.saved = None

    def finished(self, a: InOrderDigest.Attempt) -> None:
        """The attempt wrote its whole part (ending at ``a.offset``): consume finished parts in order."""
        with self._lock:
            self._done[a.start] = a.offset
            while True:
                start = next((s for s, e in self._done.items() if s <= self.frontier < e), None)
                if start is None:
                    break
                self._read_into_digest(self._done.pop(start))
            for s in [s for s, e in self._done.items() if e <= self.frontier]:
                del self._done[s]

    def result(self, total: int) -> Digest:
        """The whole object's digest; every part must have finished."""
        with self._lock:
            if self.frontier != total:
                raise ChecksumMismatch(f"parts hashed in order reach byte {self.frontier}, not {total}")
            return self.digest
