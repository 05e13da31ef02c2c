"""The space: what is on disk, what may still come, and what to evict to make room.

Owns the resident set (ready records, their bytes, usage not yet written to the index), the bytes
promised to downloads in flight (reservations), object sizes learned from S3, pins (pins.py), and
the filesystem's state (``--min-free``, disk full). Admission and eviction happen in this class and
nowhere else: eviction.py (a mixin, like leasing.py, pins.py and room.py) holds that code and states the
invariants on room it keeps (``--max-size`` and the filesystem never overcommitted, the readahead window,
demand's progress, file before row, notes applied before victims are chosen, the lock order); room.py
reports why an admission was refused and this part's ``status``.

Invariants this module keeps:

* ``commit`` turns a reservation into ready bytes in one step under the state lock, so ready bytes +
  reserved bytes stay within ``--max-size`` once ``admit`` (eviction.py) reserved them; ``used`` is
  always the sum of the ready records' sizes and ``reserved`` the sum of ``reservations``;
* one reservation per URI (``_reserve`` replaces; ``release`` drops it and the waits on it);
* a file marked superseded (``Record.superseded``) is never handed out as current (``ready_path``,
  ``touch``);
* leases hold each reader's newest files only (``evict.Leases``, leasing.py): at most a 32nd of the cache
  plus two files per reader, so leases alone never make a reader wait;
* usage written to the index (``flush``) only updates rows still holding the same file, so a row eviction
  just deleted is never written back.

Locks. The state lock is the daemon's one ``threading.Condition`` (over an RLock), shared with the
schedule, readers and publisher: "ready, reserved or fetching" changes in one step for all of them.
Eviction also takes the lease ``flock`` (``lease.lock``), always BEFORE the state lock: readers hold it
shared around their fast path, and taking it after the state lock would let a reader block the daemon.
Callers hold the state lock unless a method takes the locks itself (``admit``, ``evict_for_disk``,
``fit_max_size``, ``exclusive``, ``flush``, ``space_returned``).

Talks upward only through two callables handed at construction: ``drain_notes()`` (apply readers'
pending usage notes; the readers part) and ``on_evicted(victims)`` (the evicted files as the policy
saw them, so the schedule may move its cursors back: ``evict.unread_positions``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from s3cache.manifest.catalog import Catalog
from s3cache.manifest.jobs import Landed
from s3cache.policy.evict import readahead_files
from s3cache.policy.tracker import ReaderTracker
from s3cache.reader.lease import ExclusiveLease
from s3cache.service.config import Settings
from s3cache.store.files import QUARANTINE_SHARE, Store
from s3cache.store.index import Index, Record

from .eviction import Eviction
from .leasing import Leasing
from .pins import Pins
from .room import RoomReports

log = logging.getLogger("s3cache.daemon")

# Bytes of the filesystem a download may never take: the index and directories grow as files land.
DISK_MARGIN = 256 << 10


class Space(Eviction, Leasing, Pins, RoomReports):
    def __init__(self, settings: Settings, store: Store, index: Index, cond: threading.Condition,
                 tracker: ReaderTracker, *, drain_notes: Callable[[], None],
                 on_evicted: Callable[[list[int | None]], None]) -> None:
        self.s = settings
        self.store = store
        self.index = index
        self._cond = cond
        self._tracker = tracker  # read only here: the readers part moves it
        self._drain_notes = drain_notes
        self._on_evicted = on_evicted
        self.catalog = Catalog()
        self.pinned: set[str] = set(index.get_meta("pins", []))  # `s3cache pin`; pin=1 entries too
        self.ready: dict[str, Record] = {}
        self.used = 0  # bytes of ready files
        self.landed = Landed()  # ready files and bytes per job of a manifest directory (jobs.py)
        self.reserved = 0  # bytes promised to downloads in flight
        self.reservations: dict[str, int] = {}
        # Sizes of manifest objects that the manifest did not give, learned from S3 (a first response or
        # a cached file) and kept after eviction, so that deciding whether a file fits costs no GET.
        self.known_sizes: dict[str, int] = {}
        self.disk_full = False
        self._disk_need = 0  # bytes the filesystem must have free before fetching resumes
        self.min_free_reached = False  # the last prefetch refused for the filesystem's free space
        self._open_leases(settings, store, index)  # leases.py: each reader's newest files
        # Why admissions were refused: uri -> what holds the room (see _explain); readers' waits first.
        self.waits: dict[str, dict] = {}
        self._dirty_use: dict[str, float] = {}  # last_used changed, not yet in the index
        self.evicted = 0
        self.evicted_bytes = 0
        self.quarantine_files, self.quarantine_bytes = 0, 0  # set aside by verify: count against --max-size
        self._lease_fd = store.open_lease_lock()  # made 0640 by store.open, never through a symlink
        self._lease = ExclusiveLease(self._lease_fd)

    def close(self) -> None:
        os.close(self._lease_fd)

    def apply(self, settings: Settings) -> None:
        """SIGHUP's live settings (state lock held), to the copies the leases made of them too."""
        self.s = settings
        self._apply_leases(settings)

    # == the resident set (state lock held) ===========================================================

    def load(self, rows: Iterable[tuple[str, Record]]) -> None:
        """Ready files found at start (reconcile or rebuild)."""
        for uri, rec in rows:
            self.ready[uri] = rec
            self.used += rec.size
        self.prune_quarantine()

    def prune_quarantine(self) -> None:
        """Keep the quarantine within its budget (a 64th of --max-size, and at most a few files; never
        the files a rebuild holds aside unverified) and count what stays against --max-size."""
        held = {os.path.basename(where) for _, where in (self.index.get_meta("unverified", {}) or {}).values()}
        self.quarantine_files, self.quarantine_bytes = self.store.prune_quarantine(
            self.s.max_size // QUARANTINE_SHARE, protect=held)

    def quarantine_status(self) -> dict:
        return {"files": self.quarantine_files, "bytes": self.quarantine_bytes,
                "budget": self.s.max_size // QUARANTINE_SHARE}

    def install(self, catalog: Catalog) -> list[Record]:
        """A new manifest: withdraw cached files that are not the object it now describes (another
        version, stated or listed size, or checksum claim: ``Record.stale_for``), file before row, and
        return their records. Call inside ``exclusive()``: no reader is between seeing a file and
        telling us. Work is proportional to what is cached."""
        self.catalog = catalog
        stale: list[tuple[str, Record]] = []
        for uri, rec in list(self.ready.items()):
            pos = catalog.position(uri)
            if pos is None:
                continue
            why = rec.stale_for(catalog.entry(pos))
            if why is not None:
                log.debug("%s is stale: %s", uri, why)
                self.forget(uri)
                stale.append((uri, rec))
        for uri, rec in stale:
            try:
                self.store.remove(rec.path)
            except OSError as e:  # never the end of reloading: the file is forgotten, its row goes
                log.error("could not remove the stale file %s: %s", rec.path, e)
        if stale:
            try:
                self.index.delete_many(u for u, _ in stale)
            except Exception as e:  # a row without its file is dropped at the next start
                log.error("could not drop %d stale row(s) from the index: %s", len(stale), e)
        self.known_sizes = {u: n for u, n in self.known_sizes.items() if u in catalog}
        self.landed.reset(catalog.jobs, ((catalog.position(u), r.size) for u, r in self.ready.items()))
        return [rec for _, rec in stale]

    def is_ready(self, uri: str) -> bool:
        return uri in self.ready

    def ready_uris(self):  # a live view: iterate it with the state lock held
        return self.ready.keys()

    def records(self, uris: Iterable[str] | None = None) -> list[tuple[str, Record]]:
        """A snapshot of (uri, record) of ready files: all of them, or those of ``uris`` that are."""
        return list(self.ready.items()) if uris is None else [(u, self.ready[u]) for u in uris if u in self.ready]

    def ready_path(self, uri: str) -> str | None:
        """The file of a ready object; a file removed behind our back is forgotten (fetched again).
        None for a file marked superseded (``Record.superseded``): it is never handed out as current."""
        rec = self.ready.get(uri)
        if rec is None or rec.superseded:
            return None
        if self.store.exists(rec.path):
            return rec.path
        self.forget(uri)
        return None

    def touch(self, uri: str, when: float, reader: str = "") -> bool:
        """A reader used ``uri`` at ``when`` (its last use; its lease starts now: ``reader``'s newest
        file). False if it is not ready; then ``reader``'s lease on it starts when it lands
        (``commit``), at the place in its order this call took (``Leases.ticket``)."""
        rec = self.ready.get(uri)
        if rec is None or rec.superseded:  # a superseded file is not handed out: the new one's lease
            if reader:  # dropped at commit or release; bounded (a want refused at once never lands)
                self._await(uri, reader)
            return False
        self.ready[uri] = rec.used(when)
        self._dirty_use[uri] = when
        if reader:
            self._lease_ready(reader, uri, rec.size)
        return True

    def forget(self, uri: str) -> Record | None:
        """Drop ``uri`` from the resident set (its file and row are the caller's)."""
        rec = self.ready.pop(uri, None)
        if rec is not None:
            self.used -= rec.size
            pos = self.catalog.position(uri)
            self.landed.add(pos, -rec.size, -1)
            if pos is not None and self.catalog.entry(pos).size is None:
                self.known_sizes[uri] = rec.size
            self._dirty_use.pop(uri, None)
        return rec

    def commit(self, items: list[tuple[str, Record]]) -> list[Record]:
        """Published files become ready: each one's reservation turns into ready bytes. Returns the
        records these replaced whose file was elsewhere (the caller removes those files)."""
        replaced, now = [], time.monotonic()  # leases count monotonic time
        for uri, rec in items:
            old = self.forget(uri)
            if old is not None and old.path != rec.path:
                replaced.append(old)
            self._lease_awaited(uri, rec.size, now)
            self.release(uri)
            self.ready[uri] = rec
            self.used += rec.size
            self.landed.add(self.catalog.position(uri) if self.landed.jobs else None, rec.size)
        self.disk_full = False  # a publish wrote bytes: the filesystem had room
        return replaced

    # == reservations and sizes =======================================================================

    def size_hint(self, uri: str) -> int | None:
        """The size ``uri`` is believed to have: its cached copy's (a refetch of a file S3 changed
        reserves that first, and its real size when the response says it), else the size learned."""
        rec = self.ready.get(uri)
        return rec.size if rec is not None else self.known_sizes.get(uri)

    def learn_size(self, uri: str, size: int) -> None:
        self.known_sizes[uri] = size

    def free(self) -> int:
        """Bytes under --max-size neither ready nor promised."""
        return self.s.max_size - self.used - self.reserved - self.quarantine_bytes

    def release(self, uri: str) -> None:
        size = self.reservations.pop(uri, 0)
        self.reserved -= size
        self._unawait(uri)
        self.waits.pop(uri, None)

    def _reserve(self, uri: str, size: int) -> None:
        self.reservations[uri] = size
        self.reserved += size
        self.waits.pop(uri, None)

    def disk_room(self, demand: bool) -> int:
        """Bytes the filesystem can still give a new download: free bytes less every reservation (some
        may be allocated already: counted twice, erring towards fewer downloads), less ``--min-free``
        for prefetch and a margin for the index (state lock held)."""
        room = self.store.free_bytes() - self.reserved - DISK_MARGIN
        if not demand and self.s.min_free:
            room -= int(self.store.total_bytes() * self.s.min_free)
        return room

    def room(self) -> int:
        """Bytes a prefetch may take without evicting: under --max-size and on the filesystem."""
        return min(self.free(), self.disk_room(False))

    def window(self) -> int:
        """The readahead window in files (``evict.readahead_files``): beyond it, prefetch takes free room only."""
        avg = self.catalog.avg_size or self.s.part_size
        return readahead_files(self.s.max_size, avg, self.s.readahead_bytes, self.s.readahead_files)

    # == the filesystem ===============================================================================

    def mark_disk_full(self, need: int) -> None:
        """The filesystem refused a write: fetching waits until ``need`` bytes are free (lock held)."""
        self.disk_full = True
        self._disk_need = max(need, 1 << 20)

    def space_returned(self) -> bool:
        """True once, when the filesystem has room again after a full disk (takes the state lock)."""
        if self.disk_full and self.store.free_bytes() >= self._disk_need:
            log.info("space returned on the cache filesystem; fetching resumes")
            with self._cond:
                self.disk_full = False
            return True
        return False

    # == usage ========================================================================================

    def flush(self) -> None:
        """Write readers' usage (last_used) and leases (``kept_leases``) to the index. Outside the state lock, so eviction may delete
        (or a publish replace) a row meanwhile: only rows still holding the same file are updated, in one
        transaction, so a row just deleted is never written back."""
        with self._cond:
            dirty = [(u, self.ready[u]) for u in self._dirty_use if u in self.ready]
            self._dirty_use.clear()
            changes, leases = self._leases_to_save()
        if dirty:
            self.index.touch_many(dirty)
        if leases is not None:
            self._save_leases(self.index, changes, leases)
