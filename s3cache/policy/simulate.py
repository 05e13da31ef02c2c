"""Replay access traces against plain LRU, s3cache's policy and Belady's optimum.

The s3cache column runs the daemon's own policy code (``evict.choose_victims`` and ``ReaderTracker``),
with the daemon's two kinds of fetch: demand (a reader waits) and readahead (``window`` files ahead of
each in-order reader). Files are one unit each; the cache holds ``capacity`` of them.

Cost is counted as the daemon's server sees it: a GET per fetch. "Hit rate" is 1 - GETs / accesses, so
readahead earns nothing by itself (a prefetched file is a GET too); only keeping the right files does.
For LRU and Belady (demand caching) that is the ordinary hit rate. Belady evicts the resident file whose
next access is furthest in the future, knowing the whole trace: no policy can make fewer GETs.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from . import evict
from .evict import Resident, choose_victims
from .order import Announcement, ListMap, permutation
from .tracker import ReaderTracker

Trace = list[tuple[str, int]]  # (reader, file)


@dataclass
class Result:
    accesses: int
    gets: int
    hits: int  # file resident when accessed
    stuck: int | None = None  # index of the access whose reader waits for room nothing can free

    @property
    def hit_rate(self) -> float:
        return 1 - self.gets / self.accesses if self.accesses else 0.0


def lru(trace: Trace, capacity: int) -> Result:
    cache: OrderedDict[int, None] = OrderedDict()
    gets = hits = 0
    for _, f in trace:
        if f in cache:
            cache.move_to_end(f)
            hits += 1
            continue
        gets += 1
        if len(cache) >= capacity:
            cache.popitem(last=False)
        cache[f] = None
    return Result(len(trace), gets, hits)


def belady(trace: Trace, capacity: int) -> Result:
    nxt: list[int] = [0] * len(trace)
    last: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        f = trace[i][1]
        nxt[i] = last.get(f, 1 << 60)
        last[f] = i
    cache: dict[int, int] = {}  # file -> index of its next access
    gets = hits = 0
    for i, (_, f) in enumerate(trace):
        if f in cache:
            hits += 1
        else:
            gets += 1
            if len(cache) >= capacity:
                victim = max(cache, key=cache.__getitem__)
                del cache[victim]
        cache[f] = nxt[i]
    return Result(len(trace), gets, hits)


MiB = 1 << 20


def daemon(trace: Trace, max_size: int, sizes: Sequence[int] | int, manifest: Sequence[int], *,
           readahead_bytes: int = 0, readahead_files: int = 0, part_size: int = 16 * MiB,
           lease: float = 600.0, time_leases: bool = False, low_watermark: float = 0.90,
           announce: dict[str, int] | None = None, prefill: bool = True) -> Result:
    """The daemon's schedule and policy over ``trace``, one access a second, fetches taking no time.

    Mirrors ``Daemon._next_job`` / ``_next_prefetch`` / ``_admit``: after each access, prefetch in order
    of readers' next use (``evict.next_prefetch`` with the window of ``evict.readahead_files``) or, with
    no reader's future known, the manifest from the cursor; admit by ``choose_victims``; prefetch pauses
    when that finds no room. ``sizes``: bytes of every file (an int: all the same). ``readahead_bytes``
    0 is the daemon's default, max(max_size / 8, part_size). Leases: ``evict.Leases`` (budget
    ``max_size / LEASE_SHARE``), or with ``time_leases`` the rule before it (every file resolved within
    ``lease`` seconds). ``announce``: reader -> seed of readers that announce their order each epoch
    (``order.Announcement``, epochs counted from 0 by the reader's accesses). A reader that waits for
    room nothing can free is stuck: the result says where, and the replay stops.
    """
    n = len(manifest)
    pos = {f: i for i, f in enumerate(manifest)}
    size_of = (lambda f: sizes) if isinstance(sizes, int) else (lambda f: sizes[f])  # noqa: E731
    avg = sum(size_of(f) for f in manifest) // n if n else part_size
    window = evict.readahead_files(max_size, avg, readahead_bytes or max(max_size // 8, part_size), readahead_files)
    tracker = ReaderTracker(idle=float("inf"))
    leases = evict.Leases(lease, max_size // evict.LEASE_SHARE)
    resident: dict[int, Resident] = {}
    used = 0
    gets = hits = 0
    t = 0.0
    cursor = 0
    seen: dict[str, int] = {}

    def admit(f: int, demand: bool) -> bool:
        nonlocal gets, used, cursor
        size = size_of(f)
        if size > max_size:
            return False
        if used + size > max_size:
            future = tracker.future(n, t)
            need = used + size - max_size
            extra = max(0, used + size - int(max_size * low_watermark) - need)
            victims = choose_victims(
                list(resident.values()), need=need, extra=extra, readers=[], n=n,
                target_distance=evict.target_distance(pos.get(f), demand, future, n), demand=demand, now=t,
                lease=lease, protected=tracker.current(), future=future,
                held=None if time_leases else leases.held(t))
            if victims is None:
                return False
            for v in victims:
                del resident[int(v.uri)]
                used -= v.size
            cursor = evict.rewind_cursor(cursor, victims)
        resident[f] = Resident(str(f), size, 0.0, t, pos.get(f))
        used += size
        gets += 1
        return True

    def prefetch() -> None:
        nonlocal cursor
        while True:
            future = tracker.future(n, t)
            if future:
                p, _ = evict.next_prefetch(future, lambda q: manifest[q] not in resident,
                                           lambda q: size_of(manifest[q]), window, max_size - used)
            else:
                while cursor < n and manifest[cursor] in resident:
                    cursor += 1
                p = cursor if cursor < n else None
            if p is None or not admit(manifest[p], False):
                return

    if prefill:  # before any reader comes, the daemon fills the cache in manifest order
        prefetch()
    for i, (reader, f) in enumerate(trace):
        t += 1.0
        k = seen.get(reader, 0)
        seen[reader] = k + 1
        if announce and reader in announce and n and k % n == 0:
            tracker.announce(reader, Announcement(announce[reader], k // n, ListMap(n)), t)
        p = pos.get(f)
        if p is not None:
            tracker.saw(reader, p, n, t)
        if f in resident:
            hits += 1
        elif not admit(f, True):
            return Result(i, gets, hits, stuck=i)
        elif p is not None:  # a reader that waited notes the file again as used (its want, then its use)
            tracker.saw(reader, p, n, t)
        r = resident[f]
        resident[f] = Resident(r.uri, r.size, t, r.fetched_at, r.position)
        leases.saw(reader, r.uri, r.size, t)
        prefetch()
    return Result(len(trace), gets, hits)


def s3cache_policy(trace: Trace, capacity: int, manifest: Sequence[int], window: int = 1,
                   prefill: bool = True, announce: dict[str, int] | None = None, lease: float = 0.0) -> Result:
    """The daemon with files of one unit, a cache of ``capacity`` of them and ``--readahead {window}f``."""
    return daemon(trace, capacity, 1, manifest, readahead_files=window, lease=lease, announce=announce,
                  prefill=prefill)


# -- traces ----------------------------------------------------------------------------------------


def cyclic(n: int, epochs: int) -> Trace:
    return [("r", f) for _ in range(epochs) for f in range(n)]


def shuffled(n: int, epochs: int, seed: int = 0, reader: str = "r") -> Trace:
    """Every epoch in a new order: ``order.permutation(n, seed, epoch)``, what an announcing reader says."""
    return [(reader, int(f)) for e in range(epochs) for f in permutation(n, seed, e)]


def interleaved_shuffled(n: int, epochs: int, readers: int = 3, seed: int = 0) -> Trace:
    """Several readers each shuffling every epoch (reader ``r{i}`` with seed ``seed + i``), taking turns."""
    orders = [shuffled(n, epochs, seed + i, f"r{i}") for i in range(readers)]
    return [x for step in zip(*orders) for x in step]


def interleaved(n: int, epochs: int, readers: int = 3) -> Trace:
    """Several readers each cycling through the manifest from a different offset, taking turns."""
    out: Trace = []
    for i in range(n * epochs):
        for r in range(readers):
            out.append((f"r{r}", (i + r * n // readers) % n))
    return out


def scan_with_hot_set(hot: int, scans: int, scan_len: int, seed: int = 0) -> tuple[Trace, list[int]]:
    """A hot set (the manifest) read over and over, with one-off scans of other files mixed in."""
    rng = random.Random(seed)
    out: Trace = []
    next_cold = 1_000_000
    for _ in range(scans):
        for _ in range(hot * 2):
            out.append(("train", rng.randrange(hot)))
        for _ in range(scan_len):
            out.append(("scan", next_cold))
            next_cold += 1
    return out, list(range(hot))


def table(n: int = 200, capacity: int = 100, epochs: int = 4, window: int = 2,
          lease: float = 600.0) -> list[tuple[str, Result, Result, Result]]:
    """(trace, LRU, s3cache, Belady) results, after the first epoch where there is one. The s3cache column
    is the daemon with ``--readahead {window}f`` and ``--lease`` (a reader reads a file a second)."""
    rows = []
    man = list(range(n))
    three = {f"r{i}": i for i in range(3)}
    for name, trace, warm, kw in (
        (f"cyclic, dataset 2x cache ({n} files, cache {capacity})", cyclic(n, epochs), n, {}),
        ("shuffled every epoch", shuffled(n, epochs), n, {}),
        ("shuffled every epoch, order announced", shuffled(n, epochs), n, {"announce": {"r": 0}}),
        ("3 readers interleaved, cyclic", interleaved(n, epochs), 3 * n, {}),
        ("3 readers interleaved, each shuffled", interleaved_shuffled(n, epochs), 3 * n, {}),
        ("3 readers interleaved, each shuffled, orders announced", interleaved_shuffled(n, epochs), 3 * n,
         {"announce": three}),
    ):
        rows.append((name, after_first_epoch(lru, trace, warm, capacity),
                     after_first_epoch(s3cache_policy, trace, warm, capacity, man, window, lease=lease, **kw),
                     after_first_epoch(belady, trace, warm, capacity)))
    trace, hot = scan_with_hot_set(hot=capacity // 2, scans=8, scan_len=capacity * 2)
    rows.append((f"hot set of {capacity // 2} with one-off scans", lru(trace, capacity),
                 s3cache_policy(trace, capacity, hot, window, prefill=False, lease=lease), belady(trace, capacity)))
    # Issue 11: 20 objects of 1 MiB in a 10.5 MiB cache, default --readahead (16 MiB asked: the whole cache)
    small = cyclic(20, 3)
    rows.append(("cyclic, 20 x 1 MiB in a 10.5 MiB cache, default --readahead",
                 after_first_epoch(lru, small, 20, 10),
                 after_first_epoch(daemon, small, 20, 21 * MiB // 2, MiB, list(range(20)), lease=lease),
                 after_first_epoch(belady, small, 20, 10)))
    # Issue 17 item 5: leases held for --lease seconds after each use fill the cache, and a reader waits
    trace = cyclic(n, epochs)
    rows.append((f"cyclic, dataset 2x cache, leases held {lease:.0f} s after use (the rule before)",
                 after_first_epoch(lru, trace, n, capacity),
                 after_first_epoch(daemon, trace, n, capacity, 1, man, readahead_files=window, lease=lease,
                                   time_leases=True),
                 after_first_epoch(belady, trace, n, capacity)))
    return rows


def after_first_epoch(result_fn, trace: Trace, warm: int, *args, **kw) -> Result:
    """Run a policy over the whole trace but count only accesses after the first ``warm`` ones."""
    full = result_fn(trace, *args, **kw)
    if full.stuck is not None:
        return full
    head = result_fn(trace[:warm], *args, **kw) if warm else Result(0, 0, 0)
    return Result(full.accesses - head.accesses, full.gets - head.gets, full.hits - head.hits)


def _rate(r: Result) -> str:
    return f"stuck at access {r.stuck}" if r.stuck is not None else f"{r.hit_rate:.3f}"


def markdown(rows) -> str:
    out = ["| trace | LRU | s3cache | Belady (optimal) | s3cache / Belady |", "|---|---:|---:|---:|---:|"]
    for name, a, b, c in rows:
        ratio = "-" if b.stuck is not None or not c.hit_rate else f"{b.hit_rate / c.hit_rate:.2f}"
        out.append(f"| {name} | {_rate(a)} | {_rate(b)} | {_rate(c)} | {ratio} |")
    return "\n".join(out)
