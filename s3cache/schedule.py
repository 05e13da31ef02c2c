"""The schedule: what to fetch next, and why.

Owns the manifest in fetch order (the catalog), the prefetch cursor, the demand queue (objects readers
wait on or will want, served first), objects asked for outside the manifest (``extra``), objects
blocked waiting for room, failed objects, the fetching set, and the readahead window. Workers take jobs
from ``next_job``; everything that may create work calls ``work_changed``.

Invariants it keeps:

* an object is in at most one of ready (the space's), fetching, failed and blocked when ``next_job``
  hands it out: a job is never handed out twice at once;
* demand goes before prefetch; prefetch is not handed out while the disk is full, demand is (its
  admission counts the filesystem's free bytes and may evict for it: a waiting reader never starves);
* with readers whose future is known (in order, or an announced order), prefetch goes in order of next
  use, and nothing beyond the readahead window (``evict.readahead_files``: at most a sixteenth of the
  cache) is prefetched unless it fits in free room (evicting for a file needed later than what is
  resident would be a loss);
* a job that ended without a result because the disk was full is never lost: it goes back to the demand
  queue if a reader waits on it, else behind the cursor (or to the blocked set until space returns);
* a worker sleeps only after a scan found nothing (``_scan_idle``); anything that may make an object
  worth fetching again (a manifest, an eviction, a reader moving, a lease expiring) clears it.

Lock: the daemon's state ``threading.Condition``, shared with the space, the readers and the publisher
(see space.py for why it is one lock). Every method expects it held, except ``next_job`` and
``resume_prefetch``, which take it. Workers wait on that condition in ``next_job``.

Reads the space (ready, free bytes, known sizes, disk full) and the reader tracker (positions); learns
whether a reader waits on an object through ``is_waited``, a callable handed at construction.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from .catalog import Catalog
from .config import Settings
from . import evict
from .evict import ReaderTracker
from .manifest import Entry
from .refs import ObjectRef
from .space import Space


class Schedule:
    def __init__(self, settings: Settings, space: Space, cond: threading.Condition, tracker: ReaderTracker,
                 stopping: threading.Event, *, is_waited: Callable[[str], bool]) -> None:
        self.s = settings
        self._space = space
        self._cond = cond
        self._tracker = tracker  # read only here: the readers part moves it
        self._stopping = stopping
        self._is_waited = is_waited
        self.catalog = Catalog()  # the manifest, in fetch order
        self.extra: dict[str, Entry] = {}  # objects asked for by readers but not in the manifest
        self.fetching: set[str] = set()
        self.failed: dict[str, tuple[str, str]] = {}  # uri -> (code, message)
        self.blocked: set[str] = set()  # waiting for room in the cache
        self.demand: deque[Entry] = deque()
        self.cursor = 0
        self.prefetch_paused = False
        self._scan_idle = False  # the last scan found nothing to prefetch
        self._scan_limited = False  # ... because the readahead window stopped it
        self.failures = 0  # count of failed fetches, for status

    # == the manifest =================================================================================

    def install(self, catalog: Catalog) -> None:
        """Switch to a new manifest: prefetch from its top again, retry what it lists that failed."""
        self.catalog = catalog
        for uri in [u for u in self.extra if u in catalog]:
            del self.extra[uri]
        self.cursor = 0
        self.prefetch_paused = False
        self.failed = {u: f for u, f in self.failed.items() if u not in catalog}  # listed again: retry
        self.work_changed()

    def position(self, uri: str) -> int | None:
        return self.catalog.position(uri)

    def entry_for(self, uri: str) -> Entry | None:
        pos = self.catalog.position(uri)
        return self.catalog.entry(pos) if pos is not None else self.extra.get(uri)

    def _wanted(self, uri: str) -> bool:
        return (not self._space.is_ready(uri) and uri not in self.fetching
                and uri not in self.failed and uri not in self.blocked)

    # == handing out work =============================================================================

    def next_job(self) -> tuple[Entry, bool] | None:
        """Block until there is a job: (entry, True for demand). None once the daemon stops."""
        with self._cond:
            while not self._stopping.is_set():
                while self.demand:  # even on a full disk: admission evicts for a waiting reader
                    e = self.demand.popleft()
                    if not self._space.is_ready(e.uri) and e.uri not in self.fetching:
                        self.fetching.add(e.uri)
                        return e, True
                if not self.prefetch_paused and not self._space.disk_full and not self._scan_idle:
                    e = self._next_prefetch()
                    if e is not None:
                        self.fetching.add(e.uri)
                        return e, False
                    self._scan_idle = True  # until something changes (see work_changed)
                self._cond.wait(1.0)
        return None

    def _readahead_files(self) -> int:
        """Files fetched ahead of each reader whose order is known (0: only into free room)."""
        return evict.readahead_files(self.s.max_size, self.catalog.avg_size or self.s.part_size,
                                     self.s.readahead_bytes, self.s.readahead_files)

    def _size_of(self, e: Entry) -> int:
        size = e.size if e.size is not None else self._space.size_hint(e.uri)
        return size if size is not None else self.s.part_size

    def _next_prefetch(self) -> Entry | None:
        n = len(self.catalog)
        if not n:
            return None
        fut = self._tracker.future(n, time.time())
        if not fut:
            while self.cursor < n:
                e = self.catalog.entry(self.cursor)
                if self._wanted(e.uri):
                    return e
                self.cursor += 1
            return None
        # Readers' futures are known: fill in order of next use, nearest first; beyond the readahead
        # window only into free room (evicting for a file needed later than what is resident is a loss).
        cat = self.catalog
        p, self._scan_limited = evict.next_prefetch(
            fut, lambda q: self._wanted(cat.entry(q).uri), lambda q: self._size_of(cat.entry(q)),
            self._readahead_files(), self._space.room())
        return cat.entry(p) if p is not None else None

    def work_changed(self) -> None:
        """Something may have become worth prefetching: let idle workers scan again."""
        self._scan_idle = False
        self._cond.notify_all()

    def resume_prefetch(self) -> None:
        """Something changed that may make room (eviction possible, readers moved, leases expired)."""
        with self._cond:
            if self.prefetch_paused or self.blocked:
                self.prefetch_paused = False
                for uri in self.blocked:
                    pos = self.catalog.position(uri)
                    if pos is not None:
                        self.cursor = min(self.cursor, pos)
                waiting_demand = [u for u in self.blocked if self._is_waited(u)]
                self.blocked.clear()
                for uri in waiting_demand:
                    e = self.entry_for(uri)
                    if e is not None:
                        self.demand.appendleft(e)
                self.work_changed()

    def reconsider(self) -> None:
        """Readers moved or time passed: blocked work may fit now, and the window may have moved."""
        with self._cond:
            if self.prefetch_paused or self.blocked:
                self.resume_prefetch()
            elif self._scan_limited:
                self.work_changed()

    def evicted(self, victims: list[evict.Resident]) -> None:
        """The space evicted these files: the cursor goes back to those nobody read yet (prefetched too
        early, still to come), not to files already read (``evict.rewind_cursor``)."""
        self.cursor = evict.rewind_cursor(self.cursor, victims)
        self._scan_idle = False

    # == how a job ended ==============================================================================

    def ended(self, uri: str) -> None:
        """A job ended without a result (cancelled, or the disk was full)."""
        self.fetching.discard(uri)

    def no_room(self, uri: str, demand: bool) -> None:
        """No room in the cache for ``uri`` yet: blocked; prefetch pauses until something may make room."""
        self.fetching.discard(uri)
        self.blocked.add(uri)
        if not demand:
            self.prefetch_paused = True

    def again(self, entry: Entry, demand: bool) -> None:
        """Try a job again after eviction made room on the filesystem: first if a reader waits on it,
        else from the cursor (moved back to it), or behind the demand if the manifest does not list it."""
        pos = self.catalog.position(entry.uri)
        if demand or self._is_waited(entry.uri):
            self.demand.appendleft(entry)
        elif pos is not None:
            self.cursor = min(self.cursor, pos)
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
        self.fetching.discard(uri)
        self.failed.pop(uri, None)

    def fail(self, uri: str, code: str, message: str) -> None:
        self.fetching.discard(uri)
        self.failed[uri] = (code, message)
        self.failures += 1

    # == demand =======================================================================================

    def ask(self, ref: ObjectRef) -> tuple[Entry, bool]:
        """A reader waits on ``ref`` (not ready): its entry, and whether it is already being fetched.
        A failed object is tried again when a reader asks. The caller queues the entry if not fetching."""
        uri = ref.uri
        self.failed.pop(uri, None)
        entry = self.entry_for(uri)
        if entry is None:
            entry = Entry(ref)
            self.extra[uri] = entry
        if uri in self.fetching:
            return entry, True
        self.blocked.discard(uri)
        return entry, False

    def push_front(self, entries: list[Entry]) -> None:
        """Queue ``entries`` ahead of all other demand, in this order."""
        for e in reversed(entries):
            self.demand.appendleft(e)

    def hint(self, ref: ObjectRef) -> None:
        """A reader will soon want ``ref``: an object outside the manifest is queued behind the demand,
        with no one waiting on it yet (for listed objects the readahead policy already knows)."""
        uri = ref.uri
        if self._space.is_ready(uri) or uri in self.fetching or uri in self.catalog:
            return
        entry = self.extra.setdefault(uri, Entry(ref))
        if entry not in self.demand:
            self.demand.append(entry)

    def fetch_soon(self, ref: ObjectRef) -> None:
        """Queue ``ref`` behind the demand unless it is ready or being fetched (a pin)."""
        if not self._space.is_ready(ref.uri) and ref.uri not in self.fetching:
            self.demand.append(self.entry_for(ref.uri) or self.extra.setdefault(ref.uri, Entry(ref)))

    def refetch(self, ref: ObjectRef) -> None:
        """A cached file was withdrawn: fetch the object again."""
        entry = self.entry_for(ref.uri) or Entry(ref)
        pos = self.catalog.position(ref.uri)
        if pos is not None:
            self.cursor = min(self.cursor, pos)
        self.demand.append(entry)
        self.work_changed()

    def is_fetching(self, uri: str) -> bool:
        return uri in self.fetching

    def status(self) -> dict:
        """This part's piece of ``status`` (state lock held). Proportional to what is cached and in
        flight, not to the manifest: status must stay fast with a million entries."""
        in_manifest_ready = sum(1 for u in self._space.ready_uris() if u in self.catalog)
        failed_in_manifest = sum(1 for u in self.failed if u in self.catalog)
        queued = max(0, len(self.catalog) - in_manifest_ready - failed_in_manifest
                     - sum(1 for u in self.fetching if u in self.catalog)) + len(self.demand)
        return {
            "manifest_entries": len(self.catalog),
            "queued": queued,
            "fetching": len(self.fetching),
            "failed": len(self.failed),
            "failures": [{"uri": u, "code": c, "message": m} for u, (c, m) in list(self.failed.items())[:50]],
            "prefetch_paused": self.prefetch_paused,
            "prefetch_yields_to": sum(1 for u in self.fetching if self._is_waited(u)),
            "failed_total": self.failures,
        }
