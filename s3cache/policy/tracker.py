"""Where readers are in the manifest (``ReaderTracker``): learned from the positions they resolve and
the orders they announce, for the eviction policy (evict.py's ``Future``) and the prefetch order. Pure
logic: no filesystem; durations on an injected clock (monotonic by default), so a step of the wall clock
moves no reader.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from s3cache.manifest.jobs import Jobs

from .evict import Future
from .order import Announcement


@dataclass
class _Reader:
    position: int
    steps: int  # consecutive small forward steps
    when: float
    epoch: int  # times it wrapped around the manifest
    order: Announcement | None = None  # the order it announced, if any


class ReaderTracker:
    """Where each reader is in the manifest, learned from the positions it resolves.

    A reader counts as ordered once it has made three steps in a row forward of at most ``stride``
    positions (a shuffled reader almost never does); its position is then the next file it will read.
    Wrapping from the end of the manifest back to the start begins its next epoch. A reader that
    announced its order (``announce``) is placed in that order instead. A reader silent for ``idle``
    seconds (no note, no announcement) is forgotten, its order with it.

    Silence is a duration, so it is measured on ``clock`` (monotonic by default): a step of the wall
    clock must neither forget every reader at once nor keep them all long past ``idle``. A ``now``
    given to a method is a reading of that same clock (the simulator passes its own time, with its own
    clock); the daemon passes none.
    """

    def __init__(self, idle: float = 600.0, stride: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = idle
        self.stride = stride
        self.clock = clock
        self._readers: dict[str, _Reader] = {}
        self.jobs: Jobs | None = None  # the catalog's jobs (a manifest directory), set at install

    def saw(self, reader: str, position: int, n: int, now: float | None = None) -> int:
        """Record that ``reader`` resolved ``position``; returns the reader's epoch (0-based)."""
        now = self.clock() if now is None else now
        r = self._readers.get(reader)
        if r is None:
            self._readers[reader] = _Reader(position, 0, now, 0)
            return 0
        if r.order is not None:
            r.order.saw(position)
            r.when = now
            r.position = position
            return r.order.epoch
        # Steps are counted around the reader's own job (the whole manifest without a directory's jobs)
        jobs = self._jobs(n)
        start, size = jobs.bounds(position) if jobs is not None and 0 <= position < n else (0, n)
        same = start <= r.position < start + size
        step = (position - r.position) % size if size and same else (0 if not n else n)
        r.when = now
        if size and same and step > self.stride and size - step <= self.stride:
            return r.epoch  # a small step back: notes arriving out of order, or parallel reads; stay put
        if 0 < step <= self.stride:
            r.steps += 1
        elif step != 0:
            r.steps = 0
        if position < r.position and position - start < self.stride:
            r.epoch += 1  # wrapped around, or started over from the top
        r.position = position
        return r.epoch

    def announce(self, reader: str, order: Announcement, now: float | None = None) -> None:
        """``reader`` will read in ``order`` from its cursor on (then the next epochs' orders)."""
        now = self.clock() if now is None else now
        r = self._readers.get(reader)
        if r is None:
            r = self._readers[reader] = _Reader(-1, 0, now, order.epoch)
        r.order = order
        r.when = now

    def future(self, n: int, now: float | None = None) -> Future:
        """When each manifest position is needed next, by the readers in order and the announced orders."""
        self._expire(now)
        announced = [r.order for r in self._readers.values() if r.order is not None and r.order.n]
        return Future(n, self.positions(n, now), announced, self.jobs)

    def epoch_of(self, reader: str) -> int:
        r = self._readers.get(reader)
        if r is None:
            return 0
        return r.order.epoch if r.order is not None else r.epoch

    def _expire(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for name, r in list(self._readers.items()):
            if now - r.when > self.idle:
                del self._readers[name]

    def positions(self, n: int, now: float | None = None) -> list[int]:
        """Next positions of the readers that go in order (the manifest has ``n`` entries)."""
        self._expire(now)
        if not n:
            return []
        jobs = self._jobs(n)
        return sorted({jobs.next(r.position) if jobs is not None else (r.position + 1) % n
                       for r in self._readers.values() if r.steps >= 3 and r.order is None and r.position < n})

    def _jobs(self, n: int) -> Jobs | None:
        """The catalog's jobs, if they describe a manifest of ``n`` entries."""
        return self.jobs if self.jobs is not None and self.jobs.n == n else None

    def where(self) -> list[int]:
        """The position each known reader resolved last (one per reader; for status)."""
        return [r.position for r in self._readers.values() if r.position >= 0]

    def current(self) -> set[int]:
        """The position each reader resolved last: the file it is reading now, never a victim."""
        return {r.position for r in self._readers.values() if r.position >= 0}

    def forget(self) -> None:
        self._readers.clear()

    def remap(self, moved: Callable[[int], int | None]) -> None:
        """A new manifest: ``moved(p)`` is where old position ``p`` is now (None: gone). Each reader keeps
        its epoch and announced order, its position and order's list moved to the new positions; a
        reader whose last file left the manifest counts as unordered until it steps in order again."""
        for r in self._readers.values():
            if r.position >= 0:
                q = moved(r.position)
                if q is None:
                    r.steps = 0
                r.position = -1 if q is None else q
            if r.order is not None:
                r.order.lists = r.order.lists.remapped(moved)

    def ids(self):
        """The readers tracked now (a live view)."""
        return self._readers.keys()

    def make_room(self, limit: int) -> None:
        """Past ``limit`` readers, forget those silent longest down to three quarters of it (in one sort,
        not one per new reader). Reader ids are whatever a local client sends: their number is bounded."""
        excess = len(self._readers) - limit * 3 // 4
        if len(self._readers) > limit:
            for name in sorted(self._readers, key=lambda k: self._readers[k].when)[:excess]:
                del self._readers[name]

    def __len__(self) -> int:
        return len(self._readers)
