"""Handing out work, for ``Schedule`` (schedule.py), which takes this in as a mixin: ``next_job``, the
gate that gives a worker demand first (objects readers wait on, then hints and pins), keeps the threads
beyond ``workers`` for readers' objects, and only then runs the prefetch scan (in manifest order, or in
order of readers' next use within the readahead window).

Invariants it keeps (see schedule.py for the rest): a job handed out is in ``fetching`` with the entry it
was handed out with, in one step under the state lock, so it is never handed out twice at once; while a
job's first files (``first_order``) handed out as prefetch have bytes not yet asked for (``unasked``,
a subset of ``early``, itself of ``fetching``), no other prefetch, hint or pin is handed out: they
would take connections and CPU the first record waits on (objects readers wait on still go); at most
``workers`` jobs no reader waits on are downloading (``landing`` ones, whose file waits for the
publisher, count only beyond ``workers`` of them); a worker sleeps only after a scan found nothing
(``_scan_idle``, cleared by ``work_changed``) or while prefetch holds its share of the threads; an
idle worker is woken by ``Schedule.wake`` (one per job ended or queued) or ``work_changed`` (all),
and one that takes a job wakes the next while work may remain (``_hand_out``).

Uses the attributes ``Schedule`` sets (``s``, ``_space``, ``_cond``, ``_tracker``, ``_stopping``,
``_is_waited``, ``catalog``, ``cursors``, ``demand``, ``fetching``, ``_fetching_as``, ``failed``,
``blocked``, ``replacing``, ``prefetch_paused``, ``_scan_idle``, ``_scan_limited``,
``idle_workers``, ``wakeups``, ``wake``, ``work_changed``, ``hint_rank``, ``first_files``, ``early``,
``unasked``). Imports no other
daemon part.
"""

from __future__ import annotations

from itertools import islice

from s3cache.manifest.parse import Entry
from s3cache.policy import evict

LOOK = 64  # demand entries looked at for one a reader waits on while prefetch holds its share of threads


class HandOut:
    """``next_job`` and the scans behind it, for ``Schedule`` (a mixin: see the module doc)."""

    # An idle worker looks again this often even unwoken: what changes with time alone (a backoff or a
    # lease ending) is noticed so. Tests of the wakes raise it, so that a lost wake shows as a job never
    # handed out rather than one handed out a second late.
    idle_poll = 1.0

    def _wanted(self, uri: str) -> bool:
        return (not self._space.is_ready(uri) and uri not in self.fetching
                and uri not in self.failed and uri not in self.blocked)

    def next_job(self) -> tuple[Entry, bool] | None:
        """Block until there is a job: (entry, True for demand). None once the daemon stops.

        Called by twice ``workers`` threads (``Workers.threads``); at most ``workers`` of them are on jobs
        no reader waits on (downloading: see ``_background``). The others are kept for readers' objects,
        whose fetch so starts at once whatever prefetch is doing (its GET takes a link slot first and
        prefetch streams yield theirs). With one thread per connection, a reader's object waited for a
        prefetch to finish: in bench.demand (two workers, 4 MiB/s per connection) a 4 MiB object took
        9.0 s behind 48 MiB prefetches, against 0.54 s on an idle daemon."""
        with self._cond:
            while not self._stopping.is_set():
                background = self._background()
                full = background >= self.s.workers
                held = bool(self.unasked)  # only the first files go, until all their bytes are asked for
                e = self._next_demand(full, held)  # even on a full disk: admission evicts for a waiting reader
                if e is not None:
                    self._hand_out(e, background + (not self._is_waited(e.uri)))
                    return e, True
                if not full and self._may_prefetch():
                    e = self._next_prefetch()
                    if e is not None and not (held and self.first_order(e.uri) is None):
                        self._hand_out(e, background + 1)
                        return e, False
                    if e is None:  # (one held back is handed out once ``asked`` calls work_changed)
                        self._scan_idle = True  # until something changes (see work_changed)
                self.idle_workers += 1
                try:
                    if self._cond.wait(self.idle_poll):
                        self.wakeups += 1
                finally:
                    self.idle_workers -= 1
        return None

    def _may_prefetch(self) -> bool:
        return not self.prefetch_paused and not self._space.disk_full and not self._scan_idle

    def _hand_out(self, e: Entry, background: int) -> None:
        """``e`` goes to this worker; another idle one is woken if prefetch may hand out more (with
        ``background`` jobs no reader waits on in flight, this one counted). Wakes are targeted
        (``Schedule.wake``): an entry queued wakes one worker, a job that ended one, a want one per
        prefetch it made a reader's (each frees a slot for queued hints or pins); the disk no longer
        full wakes all; each worker that takes a job wakes the next while prefetch slots remain, so
        none wakes to find nothing but at a race."""
        self.fetching.add(e.uri)
        self._fetching_as[e.uri] = e
        order = self.first_order(e.uri)
        self.hint_rank.pop(e.uri, None)
        if order is not None and not self._is_waited(e.uri):
            self.early[e.uri] = order
            self.unasked.add(e.uri)
        if self.idle_workers and background < self.s.workers and self._may_prefetch():
            self.wake()

    def first_order(self, uri: str) -> int | None:
        """Which of its job's first ``first_files`` files ``uri`` is (its place in the job's manifest),
        None if none. An object the manifest does not list (yet) is one of them when a reader's ahead hint
        put it among its next files (``hint_rank``; 1: the one after the file it waits on): a job that
        reads before the daemon installed its manifest (``--allow``) hints its next files."""
        pos = self.catalog.position(uri)
        if pos is None:
            rank = self.hint_rank.get(uri)
            return rank if rank is not None and rank < self.first_files else None
        jobs = self.catalog.jobs
        nth = pos - (jobs.bounds(pos)[0] if jobs is not None else 0)
        return nth if nth < self.first_files else None

    def first_count(self, uri: str) -> int:
        """How many first files ``uri``'s job has: ``first_files``, or fewer in a job of fewer objects
        (whose first files then share all the connections between them)."""
        pos = self.catalog.position(uri)
        if pos is None:
            return self.first_files
        jobs = self.catalog.jobs
        size = jobs.bounds(pos)[1] if jobs is not None else len(self.catalog)
        return max(1, min(self.first_files, size))

    def asked(self, uri: str) -> None:
        """Every byte of ``uri`` has been asked for (each of its GETs answered), or its job
        ended: once no first file is left so, other prefetch may go (state lock held)."""
        if uri in self.unasked:
            self.unasked.discard(uri)
            if not self.unasked:
                self.work_changed()

    def _background(self) -> int:
        """Jobs in flight that no reader waits on (prefetch, hints, pins), but for those whose file only
        waits for the publisher (``landing``), up to ``workers`` of them: a worker hands its file on
        and takes the next job at once, instead of sleeping until the publisher ends the job and wakes
        another thread (a sleep and a wake per object); beyond that many, a slow publisher holds
        prefetch back as before."""
        landing = self.landing
        n = sum(1 for u in self.fetching if u not in landing and not self._is_waited(u))
        return n + max(0, len(landing) - self.s.workers)

    def _demand_wanted(self, e: Entry) -> bool:
        return (not self._space.is_ready(e.uri) or e.uri in self.replacing) and e.uri not in self.fetching

    def _next_demand(self, waited_only: bool, held: bool = False) -> Entry | None:
        """The next demand job, taken off the queue; only one a reader waits on if ``waited_only``, or
        one that is a reader's or one of a job's first files if ``held`` (first files still asking).

        Entries a reader waits on are queued at the front (``push_front``, ``again``,
        ``resume_prefetch``), behind at most entries whose reader has left since: a look at the first
        ``LOOK`` finds them without scanning thousands of hints under the lock."""
        d = self.demand
        while d and not self._demand_wanted(next(iter(d))):  # the order popleft serves (round robin)
            d.popleft()
        if not d:
            return None
        if not waited_only and not held:
            return d.popleft()
        for e in islice(d, LOOK):
            if self._demand_wanted(e) and (self._is_waited(e.uri)
                                           or (not waited_only and self.first_order(e.uri) is not None)):
                d.remove(e)
                return e
        return None

    def _size_of(self, e: Entry) -> int:
        size = e.size if e.size is not None else self._space.size_hint(e.uri)
        return size if size is not None else self.s.part_size

    def _next_prefetch(self) -> Entry | None:
        n = len(self.catalog)
        if not n:
            return None
        fut = self._tracker.future(n)
        cat = self.catalog
        last: list = [None, None]  # the last position parsed and its entry: each is parsed once

        def entry(q: int) -> Entry:
            if last[0] != q:
                last[0], last[1] = q, cat.entry(q)  # parses the manifest line
            return last[1]

        if not fut:
            p = self.cursors.next(lambda q: self._wanted(entry(q).uri))
            return entry(p) if p is not None else None
        # Readers' futures are known: fill in order of next use, nearest first; beyond the readahead
        # window only into free room (evicting for a file needed later than what is resident is a loss).
        p, self._scan_limited = evict.next_prefetch(
            fut, lambda q: self._wanted(entry(q).uri), lambda q: self._size_of(entry(q)),
            self._space.window(), self._space.room())
        return entry(p) if p is not None else None
