"""Fault plans and request timelines for the fault proxy (faultproxy.py): a seeded random plan, and the
arithmetic of how many requests were busy when.

Invariant: a plan is a pure function of (method, path, query) and its own seeded generator; it never
breaks a HEAD's body (a HEAD has none)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

Plan = Callable[[str, str, str], "str | None"]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most of these ``(start, end)`` intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    n = best = 0
    for _, d in events:
        n += d
        best = max(best, n)
    return best


def profile(timeline: list[tuple[float, int]], t0: float, t1: float) -> dict[int, float]:
    """Seconds of ``[t0, t1]`` spent at each value of a step function given by its changes."""
    out: dict[int, float] = {}
    level = 0
    prev = t0
    for t, n in timeline:
        if t <= t0:
            level = n
            continue
        if t >= t1:
            break
        out[level] = out.get(level, 0.0) + (t - prev)
        prev, level = t, n
    out[level] = out.get(level, 0.0) + max(0.0, t1 - prev)
    return out


def random_plan(rates: dict[str, float], seed: int = 0) -> Plan:
    """A plan that injects each fault with the given probability per object request."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def plan(method: str, path: str, query: str) -> str | None:
        with lock:
            x = rng.random()
        acc = 0.0
        for fault, p in rates.items():
            acc += p
            if x < acc:
                if method == "HEAD" and fault in ("reset", "short", "flip", "stall"):
                    return None  # a HEAD has no body to break
                return fault
        return None

    return plan
