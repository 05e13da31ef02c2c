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

from .evict import Resident, ReaderTracker, choose_victims

Trace = list[tuple[str, int]]  # (reader, file)


@dataclass
class Result:
    accesses: int
    gets: int
    hits: int  # file resident when accessed

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


def s3cache_policy(trace: Trace, capacity: int, manifest: Sequence[int], window: int = 1,
                   prefill: bool = True) -> Result:
    """The daemon's policy. ``manifest`` lists files in manifest order; others are demand-only."""
    n = len(manifest)
    pos = {f: i for i, f in enumerate(manifest)}
    tracker = ReaderTracker(idle=float("inf"))
    resident: dict[int, Resident] = {}
    gets = hits = 0
    t = 0.0

    def fetch(f: int, demand: bool, target: int | None) -> bool:
        nonlocal gets
        if len(resident) >= capacity:
            readers = tracker.positions(n, t)
            victims = choose_victims(list(resident.values()), need=1, extra=0, readers=readers, n=n,
                                     target_distance=target, demand=demand, now=t, lease=0.0,
                                     protected=tracker.current())
            if not victims:
                return False
            for v in victims:
                del resident[int(v.uri)]
        resident[f] = Resident(str(f), 1, 0.0, t, pos.get(f))
        gets += 1
        return True

    if prefill:  # before any reader comes, the daemon fills the cache in manifest order
        for f in manifest[:capacity]:
            fetch(f, False, None)
    for reader, f in trace:
        t += 1.0
        p = pos.get(f)
        if p is not None:
            tracker.saw(reader, p, n, t)
        if f in resident:
            hits += 1
        else:
            fetch(f, True, 0)
        r = resident[f]
        resident[f] = Resident(r.uri, 1, t, r.fetched_at, r.position)
        for start in tracker.positions(n, t):  # readahead, nearest first
            for k in range(window):
                g = manifest[(start + k) % n]
                if g not in resident and not fetch(g, False, k):
                    break
    return Result(len(trace), gets, hits)


# -- traces ----------------------------------------------------------------------------------------


def cyclic(n: int, epochs: int) -> Trace:
    return [("r", f) for _ in range(epochs) for f in range(n)]


def shuffled(n: int, epochs: int, seed: int = 0) -> Trace:
    rng = random.Random(seed)
    out: Trace = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        out += [("r", f) for f in order]
    return out


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


def after_first_epoch(result_fn, trace: Trace, warm: int, *args, **kw) -> Result:
    """Run a policy over the whole trace but count only accesses after the first ``warm`` ones."""
    head = result_fn(trace[:warm], *args, **kw) if warm else Result(0, 0, 0)
    full = result_fn(trace, *args, **kw)
    return Result(full.accesses - head.accesses, full.gets - head.gets, full.hits - head.hits)


def table(n: int = 200, capacity: int = 100, epochs: int = 4, window: int = 2) -> list[tuple[str, float, float, float]]:
    """(trace, LRU, s3cache, Belady) hit rates, after the first epoch where there is one."""
    rows = []
    manifest = list(range(n))
    for name, trace, warm, man in (
        (f"cyclic, dataset 2x cache ({n} files, cache {capacity})", cyclic(n, epochs), n, manifest),
        ("shuffled every epoch", shuffled(n, epochs), n, manifest),
        ("3 readers interleaved, cyclic", interleaved(n, epochs), 3 * n, manifest),
    ):
        rows.append((name,
                     after_first_epoch(lru, trace, warm, capacity).hit_rate,
                     after_first_epoch(s3cache_policy, trace, warm, capacity, man, window).hit_rate,
                     after_first_epoch(belady, trace, warm, capacity).hit_rate))
    trace, hot = scan_with_hot_set(hot=capacity // 2, scans=8, scan_len=capacity * 2)
    rows.append((f"hot set of {capacity // 2} with one-off scans", lru(trace, capacity).hit_rate,
                 s3cache_policy(trace, capacity, hot, window, prefill=False).hit_rate,
                 belady(trace, capacity).hit_rate))
    return rows


def markdown(rows) -> str:
    out = ["| trace | LRU | s3cache | Belady (optimal) | s3cache / Belady |", "|---|---:|---:|---:|---:|"]
    for name, a, b, c in rows:
        out.append(f"| {name} | {a:.3f} | {b:.3f} | {c:.3f} | {b / c if c else 0:.2f} |")
    return "\n".join(out)
