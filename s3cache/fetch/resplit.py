"""Re-splitting a download that a reader started waiting on: the answer streaming on one connection stops
at a chunk boundary, and the rest of the object is fetched in ranged parts over the free connections.

A prefetch streams a whole object on one connection (one GET: fewer requests, and prefetch has many
objects in flight). Once a reader waits on it, one connection is too few (~8-80 MB/s each): the reader
would wait for the whole object at that rate. ``CutBody`` wraps the answer's body and, between chunks,
asks whether to stop; it then reads as ended (``b""``), so the stream ends short and is closed (its
connection is not reused), and ``at`` says where the rest begins. ``read_into`` feeds the bytes the parts
wrote into the whole object's digest afterwards, in order, from the file (the page cache), so the digest
still sees every byte once, in order, as the stream would have fed it.

Invariants: ``at`` is None until a cut, then the offset of the first byte not read (the body never reads
past it); a cut happens only between chunks, never inside one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from s3cache.errors import ChecksumMismatch

from .checksum import CHUNK, Digest


class CutBody:
    """A response body that reads as ended once ``cut(left)`` (asked before each read while bytes are
    left, with the bytes left to the end ``total``) returns True."""

    def __init__(self, body, total: int, cut: Callable[[int], bool]) -> None:
        self.body = body
        self.total = total
        self._cut = cut
        self.pos = 0
        self.at: int | None = None

    def read(self, n: int = -1) -> bytes:
        if self.at is None and self.pos < self.total and self._cut(self.total - self.pos):
            self.at = self.pos
        if self.at is not None:
            return b""
        data = self.body.read(n)
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.body.close()

    @property
    def _raw_stream(self):
        """The socket under the body, for ``Streams.abort`` (stopping wakes a blocked read through it)."""
        return getattr(self.body, "_raw_stream", self.body)


def read_into(digest: Digest, fd: int, start: int, end: int) -> int:
    """Feed the file's bytes ``[start, end)`` into ``digest``, in order; returns how many."""
    pos = start
    while pos < end:
        data = os.pread(fd, min(CHUNK, end - pos), pos)
        if not data:
            raise ChecksumMismatch(f"the temp file ends at {pos}, before {end}")
        digest.update(data)
        pos += len(data)
    return end - start
