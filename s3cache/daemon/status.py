"""What the daemon reports: ``status`` assembled from the parts' reports, throughput, and progress.

* ``assemble`` builds the ``status`` reply (fields in docs/operating.md) from each part's ``status()`` and a
  few daemon-wide figures; the caller holds the state lock, so the picture is consistent.
* ``Throughput``: bytes/s over the last ``TP_WINDOW`` seconds, from samples of the fetcher's byte
  counter taken once a second by housekeeping.
* ``measure`` / ``Progress``: where the manifest stands (STATUS=, the INFO progress line, serve's bar),
  and when to say it.

Invariants: nothing here changes a part's state, only reads it; no credentials leave through status
(failure messages and manifest errors go through ``redact_urls``); progress costs a pass over the ready
files, so it is computed at most once per ``PROGRESS_EVERY`` seconds unless serve draws a bar, and
STATUS= is sent only when its line changed. Log lines keep the daemon's logger name (``s3cache.daemon``),
as before this module was split out of daemon.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from s3cache.manifest import jobs
from s3cache.service import notify
from s3cache.service.config import redact_urls

if TYPE_CHECKING:
    from s3cache.fetch.s3api import Counters
    from s3cache.sockets.control import Server

    from .maintenance import Maintenance
    from .manifest_watch import ManifestWatch
    from .publisher import Publisher
    from .readers import Readers
    from .schedule import Schedule
    from .space import Space
    from .supervise import LoopErrors
    from .workers import Workers

log = logging.getLogger("s3cache.daemon")

PROGRESS_EVERY = 5.0  # seconds between INFO progress lines (and STATUS= updates) while work is pending
TP_WINDOW = 10.0  # seconds of arrivals the throughput figure averages over


class Throughput:
    """Bytes/s from ``counter`` (the fetcher's byte count). Invariant: samples only grow in time; at most
    64 are kept (a minute of one-a-second samples, more than ``TP_WINDOW`` needs)."""

    def __init__(self, counter: Callable[[], int]) -> None:
        self._counter = counter
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)

    def sample(self) -> None:
        """Record the counter now (housekeeping, once a second; the first at start, at 0 bytes)."""
        self._samples.append((time.monotonic(), self._counter()))

    def rate(self) -> float:
        """Bytes/s that arrived over the last ~10 s, up to now: the byte counter read now against the
        oldest sample in that window (samples are taken once a second from start, the first at 0
        bytes), so a burst shorter than a sampling interval still shows."""
        now = time.monotonic()
        current = self._counter()
        base = None
        for t, b in self._samples:
            if t >= now - TP_WINDOW:
                base = (t, b)
                break
        if base is None:
            return 0.0
        t0, b0 = base
        return (current - b0) / max(now - t0, 1.0)


def manifest_bytes(schedule: Schedule, space: Space) -> dict:
    """``manifest_bytes`` of status (state lock held): the manifest's bytes whose size is known (given
    by the manifest or learned from S3), those ready, and the entries whose size is still unknown.
    Proportional to what is cached and known, not to the manifest."""
    catalog = schedule.catalog
    total, unknown, ready = catalog.total_size, len(catalog) - catalog.sized, 0
    learned: set[str] = set()
    for uri, rec in space.records():
        pos = catalog.position(uri)
        if pos is None:
            continue
        ready += rec.size
        if not catalog.has_size(pos):
            total += rec.size
            unknown -= 1
            learned.add(uri)
    for uri, size in space.known_sizes.items():
        pos = catalog.position(uri)
        if pos is not None and uri not in learned and not catalog.has_size(pos):
            total += size
            unknown -= 1
    return {"total": total, "ready": ready, "unknown_sizes": max(0, unknown)}


def measure(cond: threading.Condition, schedule: Schedule, space: Space, rate: Callable[[], float]) -> dict:
    """Where the manifest stands, for STATUS=, the progress log line and serve's bar."""
    with cond:
        mb = manifest_bytes(schedule, space)
        sched = schedule.status()
        catalog = schedule.catalog
        done = sum(1 for u, r in space.ready.items() if u in catalog and not r.superseded)
        pending = sched["queued"] + sched["fetching"]
    total = mb["total"] if mb["unknown_sizes"] == 0 else None
    bps = rate()
    line = notify.progress_line(done, len(catalog), mb["ready"], total, bps)
    return {"objects_done": done, "objects_total": len(catalog), "bytes_done": mb["ready"],
            "bytes_total": total, "bytes_per_s": bps, "pending": pending, "failed": sched["failed"],
            "line": line}


class Progress:
    """When to say how far the manifest got. Housekeeping's thread alone calls ``report``.

    Invariants: STATUS= only when the line changed, at most every PROGRESS_EVERY s (or at once when work
    is done); an INFO line every PROGRESS_EVERY s while work is pending and once when it is done, unless
    serve draws a bar (``on_progress``), which gets every measurement instead."""

    def __init__(self) -> None:
        self._sent = (0.0, "")  # (when, line) of the last STATUS= line
        self._logged = 0.0
        self._at = float("-inf")  # when progress was last computed
        self._was_pending = True  # so that a start with nothing to do still logs where it stands

    def report(self, measure: Callable[[], dict], on_progress: Callable[[dict], None] | None) -> None:
        now = time.monotonic()
        when, last = self._sent
        # Progress costs a pass over the ready files: once per PROGRESS_EVERY, unless a bar is drawn.
        if on_progress is None and now - self._at < PROGRESS_EVERY:
            return
        self._at = now
        p = measure()
        if p["line"] != last and (now - when >= PROGRESS_EVERY or not p["pending"]):
            notify.status(p["line"])
            self._sent = (now, p["line"])
        if on_progress is not None:
            on_progress(p)
        elif p["pending"] and now - self._logged >= PROGRESS_EVERY or self._was_pending and not p["pending"]:
            log.info("progress: %s%s", p["line"], f", {p['failed']} failed" if p["failed"] else "")
            self._logged = now
        self._was_pending = bool(p["pending"])


def jobs_status(schedule: Schedule, space: Space, readers: Readers) -> dict[str, dict]:
    """Each job of a manifest directory under its name (jobs.report); empty for a single manifest."""
    cat = schedule.catalog
    if cat.jobs is None:
        return {}
    return jobs.report(cat.jobs, space.landed, readers.job_stats, readers.tracker.where(), cat.job_bytes)


def assemble(*, root: str, started_at: float, manifest: str | None, schedule: Schedule, space: Space,
             readers: Readers, publisher: Publisher, maintenance: Maintenance, workers: Workers,
             watch: ManifestWatch | None, server: Server | None, counters: Counters | None,
             errors_by_code: dict[str, int], loop_errors: LoopErrors, throughput: float) -> dict:
    """The ``status`` reply, from each part's report (state lock held by the caller). ``watch``: the
    manifest watch or None; ``server``: the socket server or None; ``counters``: the fetcher's or None."""
    sched, spc, rdr = schedule.status(), space.status(), readers.status()
    # A copy verify found superseded stays on disk (readers holding it keep reading) but is never handed
    # out: its object is not ready but queued or fetching again (Schedule.status counts it there).
    superseded = sum(1 for r in space.ready.values() if r.superseded)
    stats = {**publisher.status(), "evicted": spc["evicted"], "evicted_bytes": spc["evicted_bytes"],
             "hits": rdr["hits"], "misses": rdr["misses"],
             "failures_total": sched["failures_total"], "wait_seconds": rdr["wait_seconds"]}
    return {
        "cache_dir": root,
        "pid": os.getpid(),
        "uptime": round(time.time() - started_at, 1),
        "manifest": manifest,
        "manifest_entries": sched["manifest_entries"],
        "objects": {"queued": sched["queued"], "fetching": sched["fetching"], "ready": spc["ready"] - superseded,
                    "failed": sched["failed"]},
        "bytes": spc["bytes"],
        "throughput_bytes_per_s": round(throughput),
        "verified_by": spc["verified_by"],
        "failures": [{**f, "message": redact_urls(f["message"])} for f in sched["failures"]],
        "failed_permanent": sched["failed_permanent"],
        "failed_retrying": sched["failed_retrying"],
        "next_retry_in": sched["next_retry_in"],
        "retries_released": sched["retries_released"],
        "hints": sched["hints"],
        "manifest_errors": [redact_urls(e) for e in watch.errors] if watch else [],
        "unverified": maintenance.status()["unverified"],
        **(watch.status() if watch else {}),
        "prefetch_paused": sched["prefetch_paused"],
        "prefetch_yields_to": sched["prefetch_yields_to"],
        "disk_full": spc["disk_full"],
        "min_free_reached": spc["min_free_reached"],
        "leases": spc["leases"],
        "waiting_for_space": spc["waiting_for_space"],
        "pinned": spc["pinned"],
        "quarantine": space.quarantine_status(),
        "readers": rdr["readers"],
        "jobs": jobs_status(schedule, space, readers),
        "epochs": rdr["epochs"],
        "waiting": rdr["waiting"],
        "notes_rejected": rdr["notes_rejected"],
        "out_of_scope": {"wants": readers.out_of_scope, "hints": readers.hints_out_of_scope},
        "requests": counters.requests if counters else 0,
        "retries": counters.retries if counters else 0,
        "sockets": server.counters() if server is not None else {},
        "errors_by_code": dict(errors_by_code),
        "disk_full_pauses": workers.disk_full_pauses,
        "manifest_bytes": manifest_bytes(schedule, space),
        "loop_errors": loop_errors.status(),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()},
    }
