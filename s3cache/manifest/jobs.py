"""Jobs of a manifest directory (``serve --manifest-dir``): each ``*.txt`` file is one job's manifest.

The daemon's catalog is the jobs' manifests one after another (in file-name order), so every part that
speaks in positions (the space, the schedule, the readers) keeps working on one list. What this module
adds is what "one after another" must not mean:

* ``Jobs`` says which job a position belongs to. A reader of one job wraps around to the start of its
  own job at the end of an epoch, never into the next job's files (``next``, ``distance``, ``ahead``),
  so one job's readers never make another job's files look needed, nor its own look unneeded.
* ``Cursors`` hands out manifest-order prefetch one job at a time in turn (round robin by file), so a
  job added beside a long one starts fetching at once instead of after the long one's last file.

A retired job (its file removed) leaves the catalog: its cached files are then in no manifest, the
first the eviction policy takes (``evict.choose_victims``' transient class), before any live job's.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

SUFFIX = ".txt"


class JobStart(NamedTuple):
    """In a manifest directory's stream of entries: the next entries are job ``name``'s."""

    name: str


def job_name(file_name: str) -> str | None:
    """The job a file of the manifest directory describes (its name without ``.txt``); None for files
    that are not manifests (other suffixes, hidden files and editors' temporaries such as ``.m.txt.swp``)."""
    if file_name.startswith(".") or not file_name.endswith(SUFFIX) or len(file_name) == len(SUFFIX):
        return None
    return file_name[: -len(SUFFIX)]


class Jobs:
    """The jobs as ranges of catalog positions: job ``i`` holds ``[starts[i], starts[i+1])`` (the last
    one up to ``n``). Immutable; a job with no entry in this host's share has an empty range."""

    def __init__(self, names: Sequence[str], starts: Sequence[int], n: int) -> None:
        self.names = list(names)
        self.starts = list(starts)
        self.ends = self.starts[1:] + [n]
        self.n = n

    def __len__(self) -> int:
        return len(self.names)

    def index(self, position: int) -> int:
        """The job holding ``position`` (0 <= position < n)."""
        return bisect_right(self.starts, position) - 1

    def name(self, position: int) -> str:
        return self.names[self.index(position)]

    def bounds(self, position: int) -> tuple[int, int]:
        """(first position, number of positions) of the job holding ``position``."""
        i = self.index(position)
        return self.starts[i], self.ends[i] - self.starts[i]

    def next(self, position: int) -> int:
        """The position a reader reads after ``position``: the next one in its job, wrapping to the job's
        first at its end (the reader's next epoch)."""
        i = self.index(position)
        return position + 1 if position + 1 < self.ends[i] else self.starts[i]

    def distance(self, position: int, reader_next: int) -> int | None:
        """Files a reader whose next position is ``reader_next`` reads before ``position``; None when
        ``position`` is another job's (that reader never reads it)."""
        i = self.index(reader_next)
        if not self.starts[i] <= position < self.ends[i]:
            return None
        return (position - reader_next) % (self.ends[i] - self.starts[i])

    def ahead(self, reader_next: int, k: int) -> int | None:
        """The position a reader reads ``k`` files from now (None beyond one epoch of its job)."""
        i = self.index(reader_next)
        size = self.ends[i] - self.starts[i]
        if k >= size:
            return None
        return self.starts[i] + (reader_next - self.starts[i] + k) % size


class Cursors:
    """Where manifest-order prefetch stands in each job (one cursor for a single manifest).

    Invariants: job ``i``'s cursor stays within ``[start, end]``; every position of a job before its
    cursor was found not wanted when the cursor passed it, or was handed out (``rewind`` takes the
    cursor back to a position that may be wanted again); ``next`` takes the jobs in turn, one file from
    each, starting after the job it last served.
    """

    def __init__(self, jobs: Jobs | None, n: int) -> None:
        self._starts = [0] if jobs is None else list(jobs.starts)
        self._ends = [n] if jobs is None else list(jobs.ends)
        self._at = list(self._starts)
        self._turn = 0

    def rewind(self, position: int) -> None:
        """``position`` may be wanted again: its job's scan goes back to it."""
        i = bisect_right(self._starts, position) - 1
        if i >= 0 and position < self._ends[i]:
            self._at[i] = min(self._at[i], position)

    def next(self, wanted: Callable[[int], bool]) -> int | None:
        """The next wanted position of the next job in turn that has one; None when no job has."""
        k = len(self._at)
        for j in range(k):
            i = (self._turn + j) % k
            while self._at[i] < self._ends[i]:
                p = self._at[i]
                if wanted(p):
                    self._turn = (i + 1) % k
                    return p
                self._at[i] += 1
        return None

    def positions(self) -> list[int]:
        """Each job's cursor (for status and tests)."""
        return list(self._at)


class Landed:
    """How many of each job's objects, and bytes, are cached: kept by the space as files land and leave,
    counted afresh for each catalog (``reset``), so ``status`` reports jobs without walking the cache.

    Invariant: ``files[i]``/``bytes[i]`` count the ready files whose position is in job ``i`` of ``jobs``
    (all zero and unused without jobs).
    """

    def __init__(self) -> None:
        self.jobs: Jobs | None = None
        self.files: list[int] = []
        self.bytes: list[int] = []

    def reset(self, jobs: Jobs | None, ready: Iterable[tuple[int | None, int]]) -> None:
        """A new catalog's ``jobs``; ``ready``: (position or None, size) of every ready file."""
        self.jobs = jobs
        self.files = [0] * (len(jobs) if jobs else 0)
        self.bytes = [0] * len(self.files)
        if jobs is not None:
            for pos, size in ready:
                self.add(pos, size)

    def add(self, position: int | None, size: int, files: int = 1) -> None:
        """A file of ``size`` bytes at ``position`` landed (``files=-1``: left, ``size`` negative)."""
        if self.jobs is not None and position is not None and 0 <= position < self.jobs.n:
            i = self.jobs.index(position)
            self.files[i] += files
            self.bytes[i] += size


class JobStats:
    """Readers' counts per job: hits, misses and seconds waited, by job name. Kept across catalogs for
    the jobs still in them (adding a job does not clear the others'), dropped with a retired job."""

    def __init__(self) -> None:
        self.jobs: Jobs | None = None
        self._counts: dict[str, list[float]] = {}  # name -> [hits, misses, wait seconds]

    def install(self, jobs: Jobs | None) -> None:
        self.jobs = jobs
        names = set(jobs.names) if jobs is not None else set()
        self._counts = {n: c for n, c in self._counts.items() if n in names}

    def add(self, position: int | None, hits: int = 0, misses: int = 0, wait: float = 0.0) -> None:
        if self.jobs is None or position is None or not 0 <= position < self.jobs.n:
            return
        c = self._counts.setdefault(self.jobs.name(position), [0, 0, 0.0])
        c[0] += hits
        c[1] += misses
        c[2] += wait

    def of(self, name: str) -> tuple[int, int, float]:
        hits, misses, wait = self._counts.get(name, [0, 0, 0.0])
        return int(hits), int(misses), wait


def report(jobs: Jobs, landed: Landed, stats: JobStats, reader_positions: Iterable[int],
           total_bytes: Sequence[int]) -> dict[str, dict]:
    """``status``' ``jobs``: per job name, its objects and bytes landed of its total, its readers (those
    whose last file is the job's), hits, misses, hit rate and seconds readers waited."""
    readers = [0] * len(jobs)
    for p in reader_positions:
        if 0 <= p < jobs.n:
            readers[jobs.index(p)] += 1
    out = {}
    for i, name in enumerate(jobs.names):
        hits, misses, wait = stats.of(name)
        out[name] = {
            "objects": jobs.ends[i] - jobs.starts[i],
            "ready": landed.files[i] if i < len(landed.files) else 0,
            "bytes_total": total_bytes[i] if i < len(total_bytes) else 0,
            "bytes_ready": landed.bytes[i] if i < len(landed.bytes) else 0,
            "readers": readers[i],
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / max(1, hits + misses), 4),
            "wait_seconds": round(wait, 3),
        }
    return out
