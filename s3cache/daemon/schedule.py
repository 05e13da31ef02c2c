"""The schedule: what to fetch next, and why.

Owns the manifest in fetch order (the catalog), the prefetch cursors (one per job: jobs.py), the demand
queue (demand.py; objects readers wait on or will want, served first), objects asked for outside the
manifest (``extra``), objects blocked waiting for room, failed objects, the fetching set, and the
readahead window. Workers take jobs from ``next_job``; everything that may create work calls
``work_changed``. Handing out work (the demand gate, then the prefetch scan) is handout.py's, a mixin.

Invariants it keeps:

* an object is in at most one of ready (the space's), fetching, failed and blocked when ``next_job``
  hands it out: a job is never handed out twice at once;
* demand goes before prefetch; prefetch is not handed out while the disk is full, demand is (its
  admission counts the filesystem's free bytes and may evict for it: a waiting reader never starves);
* at most ``workers`` jobs no reader waits on are downloading: the workers' other threads are kept for
  objects readers wait on, so a reader's fetch never waits for a prefetch to finish (``next_job``); a
  job whose file waits for the publisher (``landing``) holds no connection and counts only beyond
  ``workers`` such jobs, so a publisher that falls behind still holds prefetch back;
* with readers whose future is known (in order, or an announced order), prefetch goes in order of next
  use, and nothing beyond the readahead window (``evict.readahead_files``: at most a sixteenth of the
  cache) is prefetched unless it fits in free room (evicting for a file needed later than what is
  resident would be a loss);
* a job that ended without a result because the disk was full is never lost: it goes back to the demand
  queue if a reader waits on it, else behind its job's cursor (or to the blocked set until space returns);
* a worker sleeps only after a scan found nothing (``_scan_idle``); anything that may make an object
  worth fetching again (a manifest, an eviction, a reader moving, a lease expiring) clears it.

Lock: the daemon's state ``threading.Condition``, shared with the space, the readers and the publisher
(see space.py for why it is one lock). Every method expects it held, except ``next_job``,
``resume_prefetch`` and ``retry_due``, which take it. Workers wait on that condition in ``next_job``:
an ended job or a queued entry wakes one of them (``wake``), ``work_changed`` all; anyone else waiting
on it for a fetch to end uses ``wait_ended``, so that a targeted wake never reaches it instead.

Reads the space (ready, free bytes, known sizes, disk full) and the reader tracker (positions); learns
whether a reader waits on an object through ``is_waited``, a callable handed at construction.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from s3cache.manifest.catalog import Catalog
from s3cache.manifest.jobs import Cursors
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef, from_identity
from s3cache.policy import evict
from s3cache.policy.tracker import ReaderTracker
from s3cache.service.config import Settings

from .demand import FIRST_FILES, DemandQueue
from .failures import RECHECK, Failure, Failures
from .handout import HandOut
from .space import Space

MAX_HINT_RANKS = 256  # hints' ranks remembered (a few per want; taken when fetched)
MAX_EXTRA = 10_000  # objects outside the manifest remembered (queued, in flight or waited on)


class Schedule(HandOut):
    def __init__(self, settings: Settings, space: Space, cond: threading.Condition, tracker: ReaderTracker,
                 stopping: threading.Event, *, is_waited: Callable[[str], bool]) -> None:
        self.s = settings
        self._space = space
        self._cond = cond
        self._tracker = tracker  # read only here: the readers part moves it
        self._stopping = stopping
        self._is_waited = is_waited
        self.catalog = Catalog()  # the manifest, in fetch order
        # Objects asked for (or hinted) by readers but not in the manifest, until they are fetched or
        # fail; at most MAX_EXTRA (least recently asked dropped: an Entry outside the manifest is only
        # its URI, so forgetting one loses nothing a new ask does not rebuild).
        self.extra: OrderedDict[str, Entry] = OrderedDict()
        self.fetching: set[str] = set()
        self._fetching_as: dict[str, Entry] = {}  # uri in fetching -> the entry its job was handed out with
        # Jobs in fetching whose file is downloaded and waits for the publisher: they hold no connection,
        # so up to ``workers`` of them do not count against prefetch's share (``HandOut._background``)
        self.landing: set[str] = set()
        self.failed = Failures()  # see failures.py: which are retried, when
        self.blocked: set[str] = set()  # waiting for room in the cache
        self.replacing: set[str] = set()  # ready, but to be fetched again (see ``replace``)
        self.demand = DemandQueue()
        self.hints_accepted = 0
        self.hints_dropped = 0  # hints for objects outside the manifest beyond MAX_EXTRA
        # uri -> its place among a reader's next files, for hints of the first few (taken when handed
        # out: ``first_order``); the oldest forgotten beyond MAX_HINT_RANKS
        self.hint_rank: dict[str, int] = {}
        self.first_files = FIRST_FILES  # how many of each job's first files are fetched early
        self.early: dict[str, int] = {}  # uri in fetching -> its order among its job's first files (early)
        self.unasked: set[str] = set()  # early jobs not all of whose bytes are asked for: other prefetch waits
        self.retries = 0  # failed objects released for another attempt by their backoff
        self.cursors = Cursors(None, 0)
        self.prefetch_paused = False
        self._scan_idle = False  # the last scan found nothing to prefetch
        self._scan_limited = False  # ... because the readahead window stopped it
        self.idle_workers = 0  # workers waiting in next_job
        self.wakeups = 0  # times a worker waiting in next_job was notified (its timeouts not counted)
        self._ending: dict[str, int] = {}  # uri -> threads waiting for its fetch to end (wait_ended)
        self.failures = 0  # count of failed fetches since start, for status ("failures_total")

    # == the manifest =================================================================================

    def install(self, catalog: Catalog) -> None:
        """Switch to a new manifest: prefetch from its top again, retry what it lists that failed."""
        self.catalog = catalog
        for uri in [u for u in self.extra if u in catalog]:
            del self.extra[uri]
        # Queued entries are the old manifest's: queue what the new one says (its version, checksums).
        self.demand = DemandQueue(self.entry_for(e.uri) or e._replace(size=None, sha256=None, md5=None,
                                                                      crc32c=None, version=None, size_is_hint=False,
                                                                      crc64nvme=None, crc32=None)
                                  for e in self.demand)
        self.cursors = Cursors(catalog.jobs, len(catalog))
        self.prefetch_paused = False
        # A permanent failure stays while the manifest says the same about the object; anything else the
        # new manifest lists is tried again now.
        self.failed.keep_if(lambda u, f: (pos := catalog.position(u)) is None
                            or (f.permanent and catalog.entry(pos) == f.entry))
        self.work_changed()

    def position(self, uri: str) -> int | None:
        return self.catalog.position(uri)

    def entry_for(self, uri: str) -> Entry | None:
        pos = self.catalog.position(uri)
        return self.catalog.entry(pos) if pos is not None else self.extra.get(uri)

    def work_changed(self) -> None:
        """Something may have become worth prefetching: let idle workers scan again."""
        self._scan_idle = False
        self._cond.notify_all()

    def wake(self, n: int = 1) -> None:
        """``n`` more jobs may be handed out (one ended, or entries were queued): wake ``n`` idle
        workers, not all of them (state lock held). Per object, waking every idle worker (up to twice
        ``workers`` threads) cost more CPU than the handout itself; a woken worker that takes a job
        wakes the next while more may remain (``HandOut._hand_out``). Workers are the state
        condition's only waiters but for ``wait_ended``'s, which a targeted notify could reach instead:
        while one waits, everyone is woken."""
        if self._ending:
            self._cond.notify_all()
        elif self.idle_workers:
            self._cond.notify(n)

    def wait_ended(self, uri: str, timeout: float) -> bool:
        """Wait (state lock held) until ``uri`` is not being fetched, at most ``timeout`` s, and no longer
        once the daemon is stopping (a stop cancels the fetch, whose end may never be routed here). True
        if it is not being fetched."""
        self._ending[uri] = self._ending.get(uri, 0) + 1
        try:
            self._cond.wait_for(lambda: uri not in self.fetching or self._stopping.is_set(), timeout=timeout)
            return uri not in self.fetching
        finally:
            self._ending[uri] -= 1
            if not self._ending[uri]:
                del self._ending[uri]

    def resume_prefetch(self) -> None:
        """Something changed that may make room (eviction possible, readers moved, leases expired)."""
        with self._cond:
            if self.prefetch_paused or self.blocked:
                self.prefetch_paused = False
                for uri in self.blocked:
                    pos = self.catalog.position(uri)
                    if pos is not None:
                        self.cursors.rewind(pos)
                # In URI order, not the set's (string hashes vary run to run): the same run every time.
                waiting_demand = [u for u in sorted(self.blocked) if self._is_waited(u)]
                # A ready object fetched again because S3 changed it: the in-order scan skips ready
                # files, so unless queued again its new version would never come (the old one stays).
                replacing = [u for u in sorted(self.blocked) if u in self.replacing and u not in waiting_demand]
                self.blocked.clear()
                for uri in waiting_demand:
                    # A reader still waits on it though the manifest may no longer list it: as an object
                    # outside the manifest, not dropped (its reader would wait until its timeout).
                    self.demand.appendleft(self.entry_for(uri) or self._remember_extra(Entry(from_identity(uri))))
                for uri in replacing:
                    if self._space.is_ready(uri) and not self.demand.has(uri):
                        self.demand.append(self.entry_for(uri) or Entry(from_identity(uri)))
                self.work_changed()

    def reconsider(self) -> None:
        """Readers moved or time passed: blocked work may fit now, and the window may have moved."""
        with self._cond:
            if self.prefetch_paused or self.blocked:
                self.resume_prefetch()
            elif self._scan_limited:
                self.work_changed()

    def evicted(self, victims: list[evict.Resident]) -> None:
        """The space evicted these files: each job's cursor goes back to those nobody read yet (prefetched too
        early, still to come), not to files already read (``evict.unread_positions``)."""
        for p in evict.unread_positions(victims):
            self.cursors.rewind(p)
        self._scan_idle = False

    # == how a job ended ==============================================================================

    def _stop_fetching(self, uri: str) -> None:
        self.fetching.discard(uri)
        self._fetching_as.pop(uri, None)
        self.early.pop(uri, None)
        self.asked(uri)
        held_slot = True
        if uri in self.landing:  # its worker went on to the next job (``landed``): no slot to give
            self.landing.discard(uri)  # back unless it counted, beyond ``workers`` landing jobs
            held_slot = len(self.landing) >= self.s.workers
        if held_slot or self._ending:
            self.wake()  # another job may go out now; or someone waits for this one to end

    def landed(self, uri: str) -> None:
        """``uri``'s download is done and its file goes to the publisher: its slot is free for the
        next job, which the worker that downloaded it takes without sleeping (the job stays in
        ``fetching`` until published or failed)."""
        if uri in self.fetching:
            self.landing.add(uri)
        self.asked(uri)

    def ended(self, uri: str) -> None:
        """A job ended without a result (cancelled, or the disk was full)."""
        self._stop_fetching(uri)

    def no_room(self, uri: str, demand: bool) -> None:
        """No room in the cache for ``uri`` yet: blocked; prefetch pauses until something may make room."""
        self._stop_fetching(uri)
        self.blocked.add(uri)
        if not demand:
            self.prefetch_paused = True

    def again(self, entry: Entry, demand: bool) -> None:
        """Try a job again after eviction made room on the filesystem: first if a reader waits on it,
        else from its job's cursor (moved back to it), or behind the demand if the manifest does not list it."""
        pos = self.catalog.position(entry.uri)
        if demand or self._is_waited(entry.uri):
            self.demand.appendleft(entry)
        elif pos is not None:
            self.cursors.rewind(pos)
        else:
            self.demand.append(entry)
        self.work_changed()

    def park(self, entry: Entry, demand: bool) -> None:
        """The disk is full and eviction freed nothing: blocked, and tried again (first, if a reader
        waits on it) each time blocked work is reconsidered (``resume_prefetch``), at most every second
        from the housekeeping loop, so a disk that stays full costs no stream of failing GETs."""
        self.blocked.add(entry.uri)

    def fetched(self, uri: str) -> None:
        """``uri`` was published."""
        self._stop_fetching(uri)
        self.failed.succeeded(uri)
        self.extra.pop(uri, None)
        self.replacing.discard(uri)

    def superseded(self, uri: str) -> None:
        """A reload changed ``uri``'s entry while it was fetched: the job was discarded; fetch it again
        as the manifest now describes it (readers waiting on it keep waiting)."""
        self._stop_fetching(uri)
        self.refetch(from_identity(uri))

    def replace(self, uri: str) -> None:
        """The cached ``uri`` is out of date (S3 has another object): fetch it again, keeping the cached
        file readable until the new one is verified and renamed over it."""
        self.replacing.add(uri)
        if uri not in self.fetching and not self.demand.has(uri):
            self.demand.append(self.entry_for(uri) or self.extra.get(uri) or self._remember_extra(Entry(from_identity(uri))))
        self.work_changed()

    def fail(self, uri: str, code: str, message: str) -> Failure | None:
        """A fetch of ``uri`` failed: remember it, permanent or with its next retry (failures.py).

        A failure counts only against the entry its fetch used: when a reload changed the manifest's
        entry for ``uri`` while it was fetched (another checksum, size or version), nothing is charged to
        the entry now in force; the object is fetched again as it describes it (as ``superseded`` does
        for a fetch that succeeded), and None is returned."""
        used = self._fetching_as.get(uri)
        self._stop_fetching(uri)
        pos = self.catalog.position(uri)
        if used is not None and pos is not None and self.catalog.entry(pos) != used:
            self.refetch(from_identity(uri))
            return None
        entry = self.entry_for(uri) or Entry(from_identity(uri))
        self.extra.pop(uri, None)
        self.failures += 1
        f = self.failed.add(entry, code, message)
        if f.permanent:
            self.replacing.discard(uri)  # the cached file stays
        # else a replacement is tried again when its backoff passes (``retry_due``); the cached file
        # stays meanwhile
        return f

    def permanent_failure(self, uri: str) -> Failure | None:
        """The permanent failure a reader asking for ``uri`` is answered with at once (no download);
        None if it is worth a fetch (not failed, transient, or NoSuchKey: one more look)."""
        f = self.failed.get(uri)
        if f is None or not f.permanent or f.code in RECHECK:
            return None
        return f

    def retry_due(self, now: float | None = None) -> int:
        """Release the failures whose backoff has passed (a bounded number per call; call about once a
        second): manifest objects are prefetched again, pinned ones outside it queued. Returns how many."""
        with self._cond:  # the housekeeping loop calls it without the lock; work_changed notifies
            return self._retry_due(now)

    def _retry_due(self, now: float | None) -> int:
        due = self.failed.due(time.monotonic() if now is None else now)
        positions: list[int] = []
        for f in due:
            uri = f.entry.uri
            pos = self.catalog.position(uri)
            if uri in self.replacing:  # ready, so prefetch would skip it: queued like ``replace`` does
                if self._space.is_ready(uri):
                    self.replace(uri)
                else:
                    self.replacing.discard(uri)
                    if pos is not None:
                        positions.append(pos)
            elif pos is not None:
                positions.append(pos)
            elif self._space.is_pinned(uri) and not self.demand.has(uri) and uri not in self.fetching:
                self.demand.append(f.entry)
            # else: nobody wants it now; a reader asking again fetches it
        if positions:  # "may be fetched again": the in-order prefetch scan goes back to them
            for p in positions:
                self.cursors.rewind(p)
            self._scan_idle = False
        if due:
            self.retries += len(due)
            self.work_changed()
        return len(due)

    def _remember_extra(self, entry: Entry) -> Entry:
        self.extra[entry.uri] = entry
        self.extra.move_to_end(entry.uri)
        while len(self.extra) > MAX_EXTRA:
            self.extra.popitem(last=False)
        return entry

    # == demand =======================================================================================

    def ask(self, ref: ObjectRef) -> tuple[Entry, bool]:
        """A reader waits on ``ref`` (not ready): its entry, and whether it is already being fetched.
        A failed object is tried again when a reader asks (the caller first answers permanent failures
        with ``permanent_failure``). The caller queues the entry if not fetching."""
        uri = ref.uri
        self.failed.discard(uri)
        entry = self.entry_for(uri)
        if entry is None:
            entry = self._remember_extra(Entry(ref))
        if uri in self.fetching:
            return entry, True
        self.blocked.discard(uri)
        return entry, False

    def push_front(self, entries: list[Entry]) -> None:
        """Queue ``entries`` ahead of all other demand, in this order."""
        for e in reversed(entries):
            self.demand.appendleft(e)
        if entries:
            self.wake(len(entries))

    def hint(self, ref: ObjectRef, rank: int | None = None) -> None:
        """A reader will soon want ``ref``: an object outside the manifest is queued behind the demand,
        with no one waiting on it yet (for listed objects the readahead policy already knows). A failed
        object is not queued by a hint (its retry is scheduled, or it failed for good). Costs O(1): hints
        come by the thousand. Beyond MAX_EXTRA objects outside the manifest, hints are dropped (counted).
        ``rank``: its place among the reader's next files (1: the one after the file it waits on), kept
        in ``hint_rank`` when queued."""
        uri = ref.uri
        if (self._space.is_ready(uri) or uri in self.fetching or uri in self.failed or self.demand.has(uri)
                or uri in self.catalog):
            return
        if uri not in self.extra and len(self.extra) >= MAX_EXTRA:
            self.hints_dropped += 1
            return
        self.hints_accepted += 1
        if rank is not None:
            self.hint_rank[uri] = rank
            if len(self.hint_rank) > MAX_HINT_RANKS:
                del self.hint_rank[next(iter(self.hint_rank))]
        self.demand.append(self._remember_extra(Entry(ref)) if uri not in self.extra else self.extra[uri])
        self.wake()

    def fetch_soon(self, ref: ObjectRef) -> None:
        """Queue ``ref`` behind the demand unless it is ready, queued or being fetched (a pin)."""
        uri = ref.uri
        if not self._space.is_ready(uri) and uri not in self.fetching and not self.demand.has(uri):
            self.failed.discard(uri)
            self.demand.append(self.entry_for(uri) or self._remember_extra(Entry(ref)))

    def refetch(self, ref: ObjectRef) -> None:
        """A cached file was withdrawn: fetch the object again."""
        entry = self.entry_for(ref.uri) or Entry(ref)
        pos = self.catalog.position(ref.uri)
        if pos is not None:
            self.cursors.rewind(pos)
        self.demand.append(entry)
        self.work_changed()

    def is_fetching(self, uri: str) -> bool:
        return uri in self.fetching

    def status(self) -> dict:
        """This part's piece of ``status`` (state lock held). Proportional to what is cached and in
        flight, not to the manifest: status must stay fast with a million entries."""
        catalog = self.catalog
        # A superseded copy is not ready (never handed out): its object counts as queued or fetching.
        ready = self._space.ready
        in_manifest_ready = sum(1 for u, r in ready.items() if u in catalog and not r.superseded)
        failed_in_manifest = sum(1 for u in self.failed if u in catalog)
        # Each object once: the manifest's not yet ready, failed or in flight, then the demand queue's
        # others (objects outside the manifest; listed ones are already counted).
        queued = max(0, len(catalog) - in_manifest_ready - failed_in_manifest
                     - sum(1 for u in self.fetching if u in catalog))
        queued += sum(1 for u in self.demand.uris() if u not in catalog and u not in self.fetching
                      and u not in self.failed and (u not in ready or ready[u].superseded))
        now = time.monotonic()
        permanent, transient = self.failed.counts()
        retry_at = [f.retry_at for _, f in self.failed.items() if f.retry_at is not None]
        shown = list(self.failed.items())[-50:]  # the most recent
        return {
            "manifest_entries": len(catalog),
            "queued": queued,
            "fetching": len(self.fetching),
            "failed": len(self.failed),
            "failures": [f.describe(now) for _, f in reversed(shown)],
            "failed_permanent": permanent,
            "failed_retrying": transient,
            "next_retry_in": round(max(0.0, min(retry_at) - now), 1) if retry_at else None,
            "retries_released": self.retries,
            "hints": {"accepted": self.hints_accepted, "dropped": self.hints_dropped},
            "prefetch_paused": self.prefetch_paused,
            "prefetch_yields_to": sum(1 for u in self.fetching if self._is_waited(u)),
            "failures_total": self.failures,
        }
