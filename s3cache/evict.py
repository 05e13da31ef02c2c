"""Which files to evict, and where readers are. Pure logic: no filesystem, no clock of its own.

The policy, as a user can follow it:

* Never evicted: a pinned file, a file resolved within the last ``lease`` seconds, the file each reader
  resolved last (it is reading it), a file being fetched.
* Files not in the manifest (fetched on demand) go first, least recently used first.
* When readers walk the manifest in order, the daemon knows when each file will be needed next: its
  distance ahead of the nearest reader, wrapping into the next epoch. It evicts the file needed furthest
  in the future (Belady's rule), and only to make room for a file needed sooner. A file just read is the
  one needed furthest away, so a dataset larger than the cache keeps a stable resident set and streams the
  rest, instead of evicting each file just before the next epoch needs it (what plain LRU does).
* With no reader in order, files already read go least recently used first. A file fetched ahead and not
  read yet is never evicted to make room for a later manifest entry: prefetch pauses instead. It may
  give way to an earlier entry (parallel workers can land entries out of order) or to a reader waiting
  on a file, furthest manifest position first.
* Files with no known future (not in the manifest, or read with no order) are evicted in a batch from the
  limit down to the low watermark, so deletions are grouped; files with a known next use are evicted one
  at a time, because evicting them early only costs a refetch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """A ready file as the policy sees it."""

    uri: str
    size: int
    last_used: float  # 0.0: never resolved by a reader
    fetched_at: float
    position: int | None  # manifest position, None if not in the manifest
    pinned: bool = False


def leased(r: Resident, now: float, lease: float) -> bool:
    return r.last_used > 0 and now - r.last_used < lease


def next_use(position: int, readers: Iterable[int], n: int) -> int | None:
    """Files until the nearest reader (at its next position) reaches ``position``; None with no readers."""
    best = None
    for r in readers:
        d = (position - r) % n
        if best is None or d < best:
            best = d
    return best


def choose_victims(
    residents: Iterable[Resident],
    *,
    need: int,
    extra: int,
    readers: list[int],
    n: int,
    target_distance: int | None,
    demand: bool,
    now: float,
    lease: float,
    protected: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[Resident] | None:
    """Victims freeing at least ``need`` bytes (plus up to ``extra`` from files with no known future).

    ``target_distance`` is how soon the file to be fetched is needed (None when unknown). ``protected``
    holds manifest positions readers are reading right now. Returns None, evicting nothing, when the
    eligible files cannot free ``need`` bytes.
    """
    transient: list[tuple[float, Resident]] = []  # not in the manifest: LRU, first to go
    cold: list[tuple[float, Resident]] = []  # in the manifest, no known future: LRU
    future: list[tuple[int, Resident]] = []  # known next use: furthest first
    unread: list[tuple[int, Resident]] = []  # prefetched, never read: only for an earlier entry or a waiting reader
    for r in residents:
        if r.pinned or leased(r, now, lease) or (r.position is not None and r.position in protected):
            continue
        if r.position is None or n == 0:
            transient.append((r.last_used or r.fetched_at, r))
        elif readers:
            d = next_use(r.position, readers, n)
            if target_distance is None or d > target_distance:
                future.append((d, r))
        elif r.last_used > 0:
            cold.append((r.last_used, r))
        elif demand or (target_distance is not None and r.position > target_distance):
            unread.append((r.position, r))
    transient.sort(key=lambda t: t[0])
    cold.sort(key=lambda t: t[0])
    future.sort(key=lambda t: -t[0])
    unread.sort(key=lambda t: -t[0])

    victims: list[Resident] = []
    freed = 0
    for _, r in transient + cold:
        if freed >= need + extra:
            break
        victims.append(r)
        freed += r.size
    for _, r in future + unread:
        if freed >= need:
            break
        victims.append(r)
        freed += r.size
    return victims if freed >= need else None


@dataclass
class _Reader:
    position: int
    steps: int  # consecutive small forward steps
    when: float
    epoch: int  # times it wrapped around the manifest


class ReaderTracker:
    """Where each reader is in the manifest, learned from the positions it resolves.

    A reader counts as ordered once it has made three steps in a row forward of at most ``stride``
    positions (a shuffled reader almost never does); its position is then the next file it will read. Wrapping from the end of the manifest back to the start
    begins its next epoch. A reader silent for ``idle`` seconds is forgotten.
    """

    def __init__(self, idle: float = 600.0, stride: int = 4) -> None:
        self.idle = idle
        self.stride = stride
        self._readers: dict[str, _Reader] = {}

    def saw(self, reader: str, position: int, n: int, now: float) -> int:
        """Record that ``reader`` resolved ``position``; returns the reader's epoch (0-based)."""
        r = self._readers.get(reader)
        if r is None:
            self._readers[reader] = _Reader(position, 0, now, 0)
            return 0
        step = (position - r.position) % n if n else 0
        r.when = now
        if n and n - step <= self.stride:
            return r.epoch  # a small step back: notes arriving out of order, or parallel reads; stay put
        if 0 < step <= self.stride:
            r.steps += 1
        elif step != 0:
            r.steps = 0
        if position < r.position and position < self.stride:
            r.epoch += 1  # wrapped around, or started over from the top
        r.position = position
        return r.epoch

    def epoch_of(self, reader: str) -> int:
        r = self._readers.get(reader)
        return r.epoch if r else 0

    def _expire(self, now: float) -> None:
        for name, r in list(self._readers.items()):
            if now - r.when > self.idle:
                del self._readers[name]

    def positions(self, n: int, now: float) -> list[int]:
        """Next positions of the readers that go in order (the manifest has ``n`` entries)."""
        self._expire(now)
        if not n:
            return []
        return sorted({(r.position + 1) % n for r in self._readers.values() if r.steps >= 3})

    def current(self) -> set[int]:
        """The position each reader resolved last: the file it is reading now, never a victim."""
        return {r.position for r in self._readers.values()}

    def forget(self) -> None:
        self._readers.clear()

    def __len__(self) -> int:
        return len(self._readers)
