"""Which files to evict. Pure logic: no filesystem, and time only as given. Where readers are is
``tracker.ReaderTracker``'s (it feeds ``Future`` here).

The policy, as a user can follow it:

* Never evicted: a pinned file, a file resolved within the last ``lease`` seconds, the file each reader
  resolved last (it is reading it), a file being fetched.
* Files not in the manifest (fetched on demand) go first, least recently used first.
* When readers walk the manifest in order, the daemon knows when each file will be needed next: its
  distance ahead of the nearest reader, wrapping into the next epoch. It evicts the file needed furthest
  in the future (Belady's rule), and only to make room for a file needed sooner. A file just read is the
  one needed furthest away, so a dataset larger than the cache keeps a stable resident set and streams the
  rest, instead of evicting each file just before the next epoch needs it (what plain LRU does).
* With no reader in order, files already read go least recently used first, for a reader waiting on a
  file or a file some reader's order needs; never for prefetch that knows no reader's future (it would
  evict each file as it is read and fetch it again: twice the GETs of plain LRU on shuffled reads).
  A file fetched ahead and not read yet is never evicted to make room for a later manifest entry:
  prefetch pauses instead. It may
  give way to an earlier entry (parallel workers can land entries out of order) or to a reader waiting
  on a file, furthest manifest position first.
* A reader may announce its order (a shuffled epoch, ``order.Announcement``): a file's next use for it
  is then its distance in that order from the reader's place, continuing into the next epoch's order.
  With several readers, in order or announced, the nearest next use over all of them counts.
* Files with no known future (not in the manifest, or read with no order) are evicted in a batch from the
  limit down to the low watermark, so deletions are grouped; files with a known next use are evicted one
  at a time, because evicting them early only costs a refetch.
* A lease protects what a reader may still open, not everything it touched for ``--lease`` seconds: each
  reader's newest files, up to its share of a budget that is a fraction of the cache (``Leases``). A
  reader that moved on holds nothing older, so leases can never fill the cache and stall a waiting reader.
* The readahead window is at most a sixteenth of the cache (``readahead_files``): each file of window
  is a file less of the resident set the policy keeps. Beyond it a prefetch takes free room only, and
  admission too evicts nothing for it (``choose_victims``' ``window``): parallel workers often find the
  room the scan saw already taken, and evicting then leaked the window (issue 11.3's flaky test).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from s3cache.manifest.jobs import Jobs

from .leases import LEASE_SHARE, Leases  # noqa: F401  (re-exported: the policy's names in one place)
from .order import Announcement


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


class Future:
    """When each manifest position will be needed next, from where the readers are.

    Distances are in files the reader resolves before it reaches the position (0: its next file): for a
    reader in manifest order, the position's distance ahead of it, wrapping into the next epoch; for one
    that announced its order, its distance in that order and then in the next epoch's. The nearest over
    all readers counts. Falsy when no reader's future is known.
    """

    def __init__(self, n: int, ordered: Iterable[int] = (), announced: Iterable[Announcement] = (),
                 jobs: Jobs | None = None) -> None:
        self.n = n
        self.ordered = sorted(set(ordered)) if n else []
        self.announced = list(announced) if n else []
        self.jobs = jobs  # a manifest directory's: an in-order reader wraps within its own job
        # Jobs no in-order reader reads: their files are needed in their own order after every need a
        # reader makes known (n + offset), so another job's reader neither starves their prefetch nor
        # makes them the first to go.
        self._idle = [] if jobs is None or not self else \
            sorted(set(range(len(jobs))) - {jobs.index(r) for r in self.ordered})
        self._idle_set = frozenset(self._idle)

    def __bool__(self) -> bool:
        return bool(self.ordered or self.announced)

    def distance(self, position: int) -> int | None:
        if self.jobs is not None:
            ds = [d for r in self.ordered if (d := self.jobs.distance(position, r)) is not None]
            best = min(ds) if ds else None
            if best is None and self.jobs.index(position) in self._idle_set:
                best = self.n + position - self.jobs.bounds(position)[0]
        else:
            best = next_use(position, self.ordered, self.n) if self.ordered else None
        for a in self.announced:
            d = a.distance(position)
            if d is not None and (best is None or d < best):
                best = d
        return best

    def upcoming(self) -> Iterator[tuple[int, int]]:
        """(distance, position) of the files readers want next, nearest first, each reader in turn at
        each distance (a position may come more than once)."""
        horizon = self.n
        if self.jobs is not None and not self.announced:  # no reader reads past its own job's end
            horizon = max((self.jobs.bounds(r)[1] for r in self.ordered), default=0)
        for k in range(horizon):
            for r in self.ordered:
                if self.jobs is None:
                    yield k, (r + k) % self.n
                elif (p := self.jobs.ahead(r, k)) is not None:
                    yield k, p
            for a in self.announced:
                p = a.at(k)
                if p is not None:
                    yield k, p
        if self._idle:  # then the jobs nobody reads in order, one file of each in turn
            assert self.jobs is not None
            spans = [(self.jobs.starts[i], self.jobs.ends[i]) for i in self._idle]
            for k in range(max(b - a for a, b in spans)):
                for a, b in spans:
                    if a + k < b:
                        yield self.n + k, a + k


def target_distance(position: int | None, demand: bool, future: Future, n: int) -> int | None:
    """How soon a file to be fetched is needed (``choose_victims``' ``target_distance``): now for a
    waiting reader; its next use when readers' futures are known; with none, its manifest position (as
    if a reader stood at the start); a manifest file no reader will want: later than anything known."""
    if demand:
        return 0
    if position is None:
        return None
    if future:
        d = future.distance(position)
        return d if d is not None else 2 * n + position
    return position


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
    future: Future | None = None,
    held: Collection[str] | None = None,
    window: int | None = None,
    partial: bool = False,
) -> list[Resident] | None:
    """Victims freeing at least ``need`` bytes (plus up to ``extra`` from files with no known future).

    ``target_distance`` is how soon the file to be fetched is needed (None when unknown). ``protected``
    holds manifest positions readers are reading right now. ``future``, when given, says when files are
    needed next (it supersedes ``readers``, the in-order readers' next positions). ``held``, when given,
    is the set of URIs under lease (``Leases.held``) and supersedes the ``lease`` seconds since last use.
    ``window``, when given, is the readahead window in files: a prefetch for a file needed that far
    ahead of a reader or further evicts nothing. Returns None, evicting nothing, when the eligible files
    cannot free ``need`` bytes; with ``partial``, every eligible file instead (a bound that must be
    approached even where leases and pins keep it from being met: a smaller ``--max-size``).
    """
    if future is None:
        future = Future(n, readers)
    if not demand and window is not None and future and target_distance is not None and target_distance >= window:
        return None  # beyond the window: free room only
    transient: list[tuple[float, Resident]] = []  # not in the manifest: LRU, first to go
    cold: list[tuple[float, Resident]] = []  # in the manifest, no known future: LRU
    later: list[tuple[int, Resident]] = []  # known next use: furthest first
    unread: list[tuple[int, Resident]] = []  # prefetched, never read: only for an earlier entry or a waiting reader
    for r in residents:
        if r.pinned or (r.position is not None and r.position in protected):
            continue
        if (r.uri in held) if held is not None else leased(r, now, lease):
            continue
        if r.position is None or n == 0:
            transient.append((r.last_used or r.fetched_at, r))
            continue
        d = future.distance(r.position) if future else None
        if d is not None:
            # A waiting reader needs its file before anything else is needed, even a reader's next file.
            if demand or target_distance is None or d > target_distance:
                later.append((d, r))
        elif r.last_used > 0:
            # never for a prefetch no reader's future asks for: it would churn (see module doc); a
            # caller with no file in view (target None: the filesystem is full) may take them
            if demand or future or target_distance is None:
                cold.append((r.last_used, r))
        elif demand or (target_distance is not None and r.position > target_distance):
            unread.append((r.position, r))
    transient.sort(key=lambda t: t[0])
    cold.sort(key=lambda t: t[0])
    later.sort(key=lambda t: -t[0])
    unread.sort(key=lambda t: -t[0])

    victims: list[Resident] = []
    freed = 0
    for _, r in transient + cold:
        if freed >= need + extra:
            break
        victims.append(r)
        freed += r.size
    for _, r in later + unread:
        if freed >= need:
            break
        victims.append(r)
        freed += r.size
    return victims if freed >= need or partial else None


def rewind_cursor(cursor: int, victims: Iterable[Resident]) -> int:
    """Where the manifest-order prefetch cursor goes after evicting ``victims``: back to the first evicted
    file nobody has read (prefetched too early; it is still to come), not to files already read: going
    back for those fetched each one again as soon as eviction freed space, for nobody."""
    return min([cursor, *unread_positions(victims)])


def unread_positions(victims: Iterable[Resident]) -> list[int]:
    """The manifest positions of the victims nobody read (prefetched too early: still to come)."""
    return [v.position for v in victims if v.position is not None and v.last_used <= 0]


READAHEAD_SHARE = 16  # the readahead window is at most 1/16 of the cache


def readahead_files(max_size: int, avg_size: int, readahead_bytes: int, readahead_files: int = 0) -> int:
    """Files fetched ahead of each reader whose order is known: ``--readahead`` (files when given, else
    bytes over the average object size), at most 1/16 of the files the cache holds, at every scale.

    Each file of window is one the resident set cannot keep, so the hit rate stays within ~1/16 of
    Belady's; a cache of fewer than 16 files gets 0: readahead only into free space, fetching on demand
    otherwise (``next_prefetch``).
    """
    avg = max(avg_size, 1)
    asked = readahead_files if readahead_files > 0 else readahead_bytes // avg
    return max(0, min(asked, (max_size // avg) // READAHEAD_SHARE))


def next_prefetch(future: Future, wanted: Callable[[int], bool], size_of: Callable[[int], int],
                  window: int, free: int) -> tuple[int | None, bool]:
    """The next manifest position to prefetch for readers whose future is known, nearest next use first:
    within ``window`` files of a reader always (eviction decides whether it is worth it), beyond it only
    into ``free`` bytes. Returns (position or None, limited): ``limited`` when the window stopped the
    scan, so a reader moving on may bring the file into it (scan again then)."""
    for k, p in future.upcoming():
        if wanted(p):
            if k < window or size_of(p) <= free:
                return p, False
            return None, True
    return None, False
