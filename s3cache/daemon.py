"""The daemon: the composition root that ties manifest, fetcher, store, index and policy together.

Threads, and what each owns:

* workers (``--workers``): take the next job (demand first, then prefetch), fetch it into a temp file.
* publisher: publishes verified temp files in batches (one index transaction and one fsync per
  directory for many objects) and wakes the readers waiting on them.
* housekeeping: flushes readers' usage to the index once a second, samples throughput, re-checks
  leases when prefetch is paused.
* control server: answers readers (``want``, ``status``, ``use``) and receives usage datagrams.
* manifest watcher (watchdog): re-reads the manifest when it changes.

All shared state is guarded by one lock (``self.lock``). Eviction additionally takes the cache's lease
lock exclusively, which readers take shared around their fast path: a reader that saw a file and sent
its usage note is either seen by the eviction or finds the file gone and asks the daemon for it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import replace

from . import manifest as manifest_mod
from .checksum import Expectation, digest_file, local_crc32c_of
from .config import Settings, human_size
from .control import PROTOCOL, Connection, Server
from .errors import ChecksumMismatch, FetchFailed, ObjectChanged, S3CacheError
from .evict import Resident, ReaderTracker, choose_victims, next_use
from .fetch import Cancelled, DiskFull, Fetched, Fetcher, NeedSpace, make_client
from .index import PUBLISHING, READY, Index, IndexCorrupt, Record
from .catalog import Catalog
from .manifest import Entry
from .paths import HASHED_DIR, PRIVATE_DIR, readable_path
from .refs import make_ref, parse_uri
from .store import Store

log = logging.getLogger("s3cache.daemon")

LEASE_LOCK = "lease.lock"


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def lease_lock_path(private_dir: str) -> str:
    return os.path.join(private_dir, LEASE_LOCK)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.store = Store(str(settings.cache_dir))
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.index: Index | None = None
        self.server: Server | None = None
        self.fetcher: Fetcher | None = None
        self._threads: list[threading.Thread] = []
        self._observer = None
        self._reload = threading.Event()
        self._manifest_seen: tuple[int, int, int] | None = None
        self._publish_q: queue.Queue = queue.Queue()
        self._lease_fd: int | None = None

        self.catalog = Catalog()  # the manifest, in fetch order
        self.extra: dict[str, Entry] = {}  # objects asked for by readers but not in the manifest
        self.ready: dict[str, Record] = {}
        self.fetching: set[str] = set()
        self.failed: dict[str, tuple[str, str]] = {}  # uri -> (code, message)
        # Sizes of manifest objects that the manifest did not give, learned from S3 (a first response or
        # a cached file) and kept after eviction, so that deciding whether a file fits costs no GET.
        self.known_sizes: dict[str, int] = {}
        self.blocked: set[str] = set()  # waiting for room in the cache
        self.reservations: dict[str, int] = {}
        self.demand: deque[Entry] = deque()
        self.pinned: set[str] = set()  # pinned with `s3cache pin` (manifest pin=1 entries are pinned too)
        self.waiters: dict[str, set[Connection]] = {}
        self.used = 0  # bytes of ready files
        self.reserved = 0  # bytes promised to downloads in flight
        self.cursor = 0
        self.prefetch_paused = False
        self._scan_idle = False  # the last scan found nothing to prefetch
        self._scan_limited = False  # ... because the readahead window stopped it
        self.disk_full = False
        self._free_checked = (-1.0, 0, 0)  # (when, free bytes, total bytes) of the last statvfs
        self._admitted_since_check = 0
        self._disk_need = 0  # bytes the filesystem must have free before fetching resumes
        self.exit_code = 0
        self.tracker = ReaderTracker(idle=max(settings.lease, 60.0))
        self._dirty_use: dict[str, float] = {}
        self._early_use: dict[str, float] = {}  # used by a reader between rename and "ready"
        self.stats = {"fetched": 0, "fetched_bytes": 0, "evicted": 0, "evicted_bytes": 0,
                      "hits": 0, "misses": 0, "failed": 0, "wait_seconds": 0.0}
        self.epochs: dict[int, dict[str, int]] = {}  # readers' epoch -> hits and misses
        self._wanted_at: dict[str, float] = {}  # when a reader first started waiting for a file
        self._tp_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self.manifest_errors: list[str] = []
        self.started_at = time.time()

    # == lifecycle ====================================================================================

    def start(self) -> None:
        """Take the cache dir, reconcile, load the manifest and start serving. Raises S3CacheError."""
        self.store.open()
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise

    def _start(self) -> None:
        lay = self.store.layout
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run", removed)
        self._lease_fd = os.open(lease_lock_path(lay.private), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        client = make_client(self.s.endpoint_url, self.s.region, pool=self.s.workers * 2 + 4,
                             connect_timeout=self.s.connect_timeout, read_timeout=self.s.read_timeout)
        self.fetcher = Fetcher(client, part_size=self.s.part_size, prefetch_part_size=self.s.prefetch_part_size,
                               workers=self.s.workers, max_attempts=self.s.max_attempts, cancel=self.stopping,
                               new_temp=self.store.new_temp, discard=self.store.discard)
        catalog = self._read_manifest() if self.s.manifest is not None else Catalog()
        self.index, damaged = self._open_index()
        self.pinned = set(self.index.get_meta("pins", []))
        if damaged:
            self._rebuild(catalog)
        else:
            self._reconcile()
        if self.s.manifest is not None:
            self._install_manifest(catalog)
        if self.s.manifest is not None:
            # Watch before anyone can see us serving, so an edit made right after start is not missed.
            self._watch_manifest()
        self.server = Server(lay.control_socket, lay.use_socket, self._handle, self._on_close)
        self.server.start()
        self._spawn(self._use_loop, "s3cache-use")
        self._spawn(self._publish_loop, "s3cache-publish")
        self._spawn(self._housekeeping_loop, "s3cache-housekeeping")
        for i in range(self.s.workers):
            self._spawn(self._worker_loop, f"s3cache-worker-{i}")
        if self.s.revalidate > 0:
            self._spawn(self._revalidate_loop, "s3cache-revalidate")
        log.info("serving %s: %d manifest entries, %d files ready (%s of %s)", lay.root,
                 len(self.catalog), len(self.ready), human_size(self.used), human_size(self.s.max_size))

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Ask every thread to stop; ``wait`` returns once they have."""
        self.stopping.set()
        self._reload.set()
        with self.cond:
            self.cond.notify_all()

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass
        self._teardown()

    def _teardown(self) -> None:
        self.stopping.set()
        self._reload.set()
        with self.cond:
            self.cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        self._publish_q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        if self.server is not None:
            self.server.stop()
        if self.fetcher is not None:
            self.fetcher.close()
        try:
            self._flush_use()
            self.store.clean_tmp()
        except OSError as e:  # the cache dir may have vanished under us
            log.error("could not clean up %s: %s", self.store.layout.root, e.strerror)
        if self.index is not None:
            try:
                self.index.close()
            except Exception:
                pass
        if self._lease_fd is not None:
            os.close(self._lease_fd)
        self.store.close()
        log.info("stopped")

    def run(self) -> int:
        """start(), stop on SIGTERM or SIGINT, clean up, return the exit code. For ``s3cache serve``."""
        # Handlers first: systemd may send SIGTERM while start() is still reconciling or listing.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self.start()
        self.wait()
        return self.exit_code

    # == index and reconcile ==========================================================================

    def _open_index(self) -> tuple[Index, bool]:
        """The index, and whether it was lost or damaged (then the disk must be re-verified)."""
        path = self.store.layout.index
        try:
            index = Index(path)
        except IndexCorrupt as e:
            aside = f"{path}.damaged.{int(time.time())}"
            log.error("%s; moving it to %s and rebuilding the index from the disk", e, aside)
            os.rename(path, aside)
            return Index(path), True
        if len(index) == 0 and self._any_cached_file():
            log.error("the index is empty but the cache holds files; rebuilding the index from the disk")
            return index, True
        return index, False

    def _cached_files(self):
        """(relative path) of every file under the cache dir outside the private dir."""
        root = self.store.layout.root
        for top in sorted(os.listdir(root)):
            if top == PRIVATE_DIR:
                continue
            for dirpath, _, files in os.walk(os.path.join(root, top)):
                for name in files:
                    yield os.path.relpath(os.path.join(dirpath, name), root)

    def _any_cached_file(self) -> bool:
        return next(iter(self._cached_files()), None) is not None

    def _rebuild(self, catalog: Catalog) -> None:
        """Re-verify every file on disk and index those that pass; remove the rest.

        The expected checksum comes from the manifest where it has one, else from S3 (one HEAD: the
        object's additional checksum or its ETag). A file in the hashed namespace cannot be mapped back
        to its key, and a file S3 no longer vouches for cannot be verified: both are removed and fetched
        again if wanted. No GET is made.
        """
        assert self.index is not None and self.fetcher is not None
        rows: list[tuple[str, Record]] = []
        removed = 0
        for rel in list(self._cached_files()):
            bucket, _, key = rel.partition("/")
            rec = None
            if bucket != HASHED_DIR:
                try:
                    ref = make_ref(bucket, key)
                    pos = catalog.position(ref.uri)
                    entry = catalog.entry(pos) if pos is not None else Entry(ref)
                    rec = self._reverify(rel, entry) if readable_path(ref) == rel else None
                except S3CacheError as e:
                    log.info("cannot re-verify %s: %s", rel, e)
            if rec is None:
                self.store.remove(rel)
                removed += 1
            else:
                rows.append((make_ref(bucket, key).uri, rec))
        self.index.put_many(rows)
        for uri, rec in rows:
            self.ready[uri] = rec
            self.used += rec.size
        log.info("rebuilt the index from the disk: %d file(s) re-verified, %d removed", len(rows), removed)

    def _reverify(self, rel: str, entry: Entry) -> Record | None:
        assert self.fetcher is not None
        path = self.store.layout.abspath(rel)
        size = os.path.getsize(path)
        expect = None
        etag = version = ""
        for method, value in (("sha256", entry.sha256), ("md5", entry.md5), ("crc32c", entry.crc32c)):
            if value:
                expect = Expectation(method, value)
                break
        if expect is None:
            described = self.fetcher.describe(entry)
            expect, etag, version = described.expect, described.etag, described.version
            if described.size != size:
                return None
        if expect is None:
            return None  # size alone is not enough to trust a file nobody watched being written
        with open(path, "rb") as f:
            digest = digest_file(f, expect)
        try:
            method = digest.check(rel, entry.size if entry.size is not None else size)
        except ChecksumMismatch as e:
            log.error("re-verification failed, removing: %s", e)
            return None
        return Record(READY, rel, size, etag, version, method, digest.local_crc32c,
                      os.path.getmtime(path), 0.0)

    def _reconcile(self) -> None:
        """Make the index agree with the disk without re-hashing or asking S3 about ready files.

        ``publishing`` rows (a crash between intent and ready) are settled by checking their file's size
        and local CRC32C; ``ready`` rows whose file is gone are dropped, so the object is fetched again.
        """
        assert self.index is not None
        promote: list[tuple[str, Record]] = []
        drop: list[str] = []
        for uri, rec in self.index.items():
            path = self.store.layout.abspath(rec.path)
            if rec.state == PUBLISHING:
                try:
                    ok = os.path.getsize(path) == rec.size and local_crc32c_of(path) == rec.crc32c
                except OSError:
                    ok = False
                if ok:
                    rec = replace(rec, state=READY)
                    promote.append((uri, rec))
                else:
                    self.store.remove(rec.path)
                    drop.append(uri)
                    continue
            elif not self.store.exists(rec.path):
                drop.append(uri)
                continue
            self.ready[uri] = rec
            self.used += rec.size
        if promote:
            self.index.put_many(promote)
        if drop:
            self.index.delete_many(drop)
        if promote or drop:
            log.info("reconciled index: %d interrupted publish(es) completed, %d missing file(s) re-queued",
                     len(promote), len(drop))

    # == manifest =====================================================================================

    def _read_manifest(self) -> Catalog:
        path = str(self.s.manifest)
        errors: list[str] = []

        def lister(bucket: str, prefix: str):
            assert self.fetcher is not None
            try:
                return self.fetcher.list(bucket, prefix)
            except (FetchFailed, Cancelled) as e:
                errors.append(f"{path}: cannot list s3://{bucket}/{prefix}: {e}")
                log.error("%s", errors[-1])
                return []

        self._manifest_seen = _identity(path)
        catalog = Catalog.build(manifest_mod.expand(manifest_mod.read(path), lister))
        self.manifest_errors = errors
        return catalog

    def _install_manifest(self, catalog: Catalog) -> None:
        """Switch to a new manifest. Work is proportional to what is cached, not to the manifest."""
        stale: list[Record] = []
        with self.lock:
            self.catalog = catalog
            for uri in [u for u in self.extra if u in catalog]:
                del self.extra[uri]
            for uri, rec in list(self.ready.items()):
                pos = catalog.position(uri)
                if pos is None:
                    continue
                e = catalog.entry(pos)
                if (e.version and rec.version != e.version) or (e.size is not None and rec.size != e.size):
                    stale.append(rec)
                    self._forget_ready(uri)
            self.cursor = 0
            self.prefetch_paused = False
            self.failed = {u: f for u, f in self.failed.items() if u not in catalog}  # listed again: retry
            self.known_sizes = {u: n for u, n in self.known_sizes.items() if u in catalog}
            self.tracker.forget()
            self._work_changed()
        for rec in stale:
            self.store.remove(rec.path)
        if stale:
            log.info("manifest asks for a different version of %d cached file(s); fetching again", len(stale))
        log.info("manifest %s: %d entries", self.s.manifest, len(catalog))

    def _watch_manifest(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        target = os.path.abspath(str(self.s.manifest))
        reload = self._reload

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
                if target in paths and event.event_type in ("created", "modified", "moved", "closed"):
                    reload.set()

        # Watch the directory, not the file: editors save by renaming a new file over the old one.
        obs = Observer()
        obs.schedule(Handler(), os.path.dirname(target), recursive=False)
        obs.daemon = True
        obs.start()
        self._observer = obs
        self._spawn(self._reload_loop, "s3cache-manifest")
        if _identity(target) != self._manifest_seen:
            reload.set()  # it changed between our reading it and the watch starting

    def _reload_loop(self) -> None:
        while True:
            self._reload.wait()
            if self.stopping.is_set():
                return
            # Let a burst of events (write, close, rename) settle into one reload. They come within
            # a millisecond or two; a longer settle only delays a job that just wrote its manifest.
            while self._reload.is_set():
                self._reload.clear()
                if self.stopping.wait(0.05):
                    return
            try:
                self._install_manifest(self._read_manifest())
            except S3CacheError as e:
                log.error("manifest not reloaded, keeping the previous one: %s", e)

    # == scheduling ===================================================================================

    def _entry_for(self, uri: str) -> Entry | None:
        pos = self.catalog.position(uri)
        return self.catalog.entry(pos) if pos is not None else self.extra.get(uri)

    def _wanted(self, uri: str) -> bool:
        return (uri not in self.ready and uri not in self.fetching
                and uri not in self.failed and uri not in self.blocked)

    def _next_job(self) -> tuple[Entry, bool] | None:
        with self.cond:
            while not self.stopping.is_set():
                while self.demand and not self.disk_full:
                    e = self.demand.popleft()
                    if e.uri not in self.ready and e.uri not in self.fetching:
                        self.fetching.add(e.uri)
                        return e, True
                if not self.prefetch_paused and not self.disk_full and not self._scan_idle:
                    e = self._next_prefetch()
                    if e is not None:
                        self.fetching.add(e.uri)
                        return e, False
                    self._scan_idle = True  # until something changes (see _work_changed)
                self.cond.wait(1.0)
        return None

    def _readahead_files(self) -> int:
        if self.s.readahead_files:
            return self.s.readahead_files
        avg = self.catalog.avg_size or self.s.part_size
        return max(1, int(self.s.readahead_bytes / max(avg, 1)))

    def _next_prefetch(self) -> Entry | None:
        n = len(self.catalog)
        if not n:
            return None
        readers = self.tracker.positions(n, time.time())
        if not readers:
            while self.cursor < n:
                e = self.catalog.entry(self.cursor)
                if self._wanted(e.uri):
                    return e
                self.cursor += 1
            return None
        # Readers go in order: fill in order of next use, nearest first; beyond the readahead window
        # only into free space (evicting for a file needed later than what is resident would be a loss).
        window = self._readahead_files()
        free = self.s.max_size - self.used - self.reserved
        self._scan_limited = False
        for k in range(n):
            for r in readers:
                e = self.catalog.entry((r + k) % n)
                if self._wanted(e.uri):
                    size = e.size if e.size is not None else self.known_sizes.get(e.uri, self.s.part_size)
                    if k < window or size <= free:
                        return e
                    self._scan_limited = True  # a reader moving on may bring this into the window
                    return None
        return None

    def _work_changed(self) -> None:
        """Something may have become worth prefetching: let idle workers scan again (lock held)."""
        self._scan_idle = False
        self.cond.notify_all()

    def _resume_prefetch(self) -> None:
        """Something changed that may make room (eviction possible, readers moved, leases expired)."""
        with self.cond:
            if self.prefetch_paused or self.blocked:
                self.prefetch_paused = False
                for uri in self.blocked:
                    pos = self.catalog.position(uri)
                    if pos is not None:
                        self.cursor = min(self.cursor, pos)
                waiting_demand = [u for u in self.blocked if u in self.waiters]
                self.blocked.clear()
                for uri in waiting_demand:
                    e = self._entry_for(uri)
                    if e is not None:
                        self.demand.appendleft(e)
                self._work_changed()

    # == space ========================================================================================

    def _admit(self, entry: Entry, size: int, demand: bool) -> bool:
        """Reserve ``size`` bytes for ``entry``, evicting by policy if needed. False: no room yet."""
        uri = entry.uri
        low_on_space = not demand and self.s.min_free and self._free_fraction() < self.s.min_free
        with self.lock:
            if uri in self.reservations:
                return True
            if low_on_space:
                log.info("free space below --min-free %.0f%%: prefetch paused", self.s.min_free * 100)
                return False
            if self.used + self.reserved + size <= self.s.max_size:
                self._reserve(uri, size)
                return True
        if size > self.s.max_size:
            return False
        # Eviction: hold the lease lock exclusively so no reader is between "saw the file" and "told us".
        assert self._lease_fd is not None
        fcntl.flock(self._lease_fd, fcntl.LOCK_EX)
        try:
            with self.lock:
                self._drain_use()
                if self.used + self.reserved + size <= self.s.max_size:
                    self._reserve(uri, size)
                    return True
                now = time.time()
                n = len(self.catalog)
                readers = self.tracker.positions(n, now)
                pos = self.catalog.position(uri)
                # How soon the new file is needed: now for a waiting reader; its distance ahead of the
                # readers in order; with none, its manifest position (as if a reader stood at the start).
                if demand:
                    target = 0
                elif pos is None:
                    target = None
                else:
                    target = next_use(pos, readers, n) if readers else pos
                need = self.used + self.reserved + size - self.s.max_size
                low = int(self.s.max_size * self.s.low_watermark)
                extra = max(0, self.used + self.reserved + size - low - need)
                victims = choose_victims(self._residents(), need=need, extra=extra, readers=readers, n=n,
                                         target_distance=target, demand=demand, now=now, lease=self.s.lease,
                                         protected=self.tracker.current())
                if victims is None:
                    return False
                self._evict(victims, uri)
                self._reserve(uri, size)
                return True
        finally:
            fcntl.flock(self._lease_fd, fcntl.LOCK_UN)

    def _evict(self, victims: list[Resident], why: str) -> None:
        """Remove victims' files, then their rows (caller holds the lease lock and the state lock)."""
        assert self.index is not None
        for v in victims:
            rec = self._forget_ready(v.uri)
            if rec is not None:
                self.store.remove(rec.path)  # the file first: a crash leaves a row to drop, not an orphan
            self.stats["evicted"] += 1
            self.stats["evicted_bytes"] += v.size
        self.index.delete_many(v.uri for v in victims)
        self.cursor = min([self.cursor] + [v.position for v in victims if v.position is not None])
        log.debug("evicted %s (%s) for %s", [v.uri for v in victims], human_size(sum(v.size for v in victims)), why)

    def _residents(self) -> list[Resident]:
        return [Resident(u, r.size, r.last_used, r.fetched_at, self.catalog.position(u), self._is_pinned(u))
                for u, r in self.ready.items()]

    def _is_pinned(self, uri: str) -> bool:
        if uri in self.pinned:
            return True
        pos = self.catalog.position(uri)
        return pos is not None and pos in self.catalog.pinned

    def _pin(self, uris: list[str], pin: bool) -> dict:
        """``s3cache pin/unpin``: keep files resident (fetching them now) or release them."""
        assert self.index is not None
        refs = [parse_uri(u) for u in uris]
        with self.cond:
            for ref in refs:
                if pin:
                    self.pinned.add(ref.uri)
                    if ref.uri not in self.ready and ref.uri not in self.fetching:
                        self.demand.append(self._entry_for(ref.uri) or self.extra.setdefault(ref.uri, Entry(ref)))
                else:
                    self.pinned.discard(ref.uri)
            self.index.set_meta("pins", sorted(self.pinned))
            self._work_changed()
            return {"ok": True, "pinned": len(self.pinned)}

    def _evict_for_disk(self, size: int) -> bool:
        """The filesystem is full: evict files nobody needs soon to free ``size`` bytes. True if done."""
        assert self._lease_fd is not None
        fcntl.flock(self._lease_fd, fcntl.LOCK_EX)
        try:
            with self.lock:
                self._drain_use()
                now = time.time()
                n = len(self.catalog)
                victims = choose_victims(self._residents(), need=size, extra=0,
                                         readers=self.tracker.positions(n, now), n=n, target_distance=None,
                                         demand=False, now=now, lease=self.s.lease,
                                         protected=self.tracker.current())
                if not victims:
                    return False
                self._evict(victims, "a full filesystem")
                return True
        finally:
            fcntl.flock(self._lease_fd, fcntl.LOCK_UN)

    def _free_fraction(self) -> float:
        """The filesystem's free fraction: statvfs at most every 100 ms (one per small object added up),
        less what was admitted since, so a burst of admissions cannot overshoot --min-free."""
        now = time.monotonic()
        with self.lock:
            when, free, total = self._free_checked
            if now - when > 0.1:
                free, total = self.store.free_bytes(), self.store.total_bytes()
                self._free_checked = (now, free, total)
                self._admitted_since_check = 0
            return max(0, free - self._admitted_since_check) / total if total else 0.0

    def _reserve(self, uri: str, size: int) -> None:
        self._admitted_since_check += size
        self.reservations[uri] = size
        self.reserved += size

    def _release(self, uri: str) -> None:
        size = self.reservations.pop(uri, 0)
        self.reserved -= size

    def _forget_ready(self, uri: str) -> Record | None:
        rec = self.ready.pop(uri, None)
        if rec is not None:
            self.used -= rec.size
            pos = self.catalog.position(uri)
            if pos is not None and self.catalog.entry(pos).size is None:
                self.known_sizes[uri] = rec.size
            self._dirty_use.pop(uri, None)
            self._scan_idle = False  # it may be wanted again
        return rec

    # == workers ======================================================================================

    def _worker_loop(self) -> None:
        assert self.fetcher is not None
        while True:
            job = self._next_job()
            if job is None:
                return
            entry, demand = job
            uri = entry.uri
            size = entry.size if entry.size is not None else self.known_sizes.get(uri)
            try:
                if size is not None and not self._admit(entry, size, demand):
                    raise NeedSpace(size)
                # Foreground while a reader waits: files a reader will want next ("ahead") come through
                # the demand queue too, and must not compete with the one it waits on. The head of the
                # manifest counts as waited on: a job that just wrote its manifest reads it first, and
                # is usually still starting up when the fetch begins.
                with self.cond:
                    foreground = (bool(self.waiters.get(uri)) if demand
                                  else self.catalog.position(uri) == 0)
                fetched = self.fetcher.fetch(entry, lambda n: self._admit(entry, n, demand), foreground=foreground)
            except NeedSpace as e:
                if e.size > self.s.max_size:
                    self._fail(uri, "TooLarge", f"{e.size} bytes will never fit in --max-size {self.s.max_size}")
                    continue
                with self.cond:
                    self.fetching.discard(uri)
                    self.known_sizes[uri] = e.size
                    self.blocked.add(uri)
                    if not demand:
                        self.prefetch_paused = True
                continue
            except Cancelled:
                with self.cond:
                    self.fetching.discard(uri)
                    self._release(uri)
                return
            except DiskFull as e:
                with self.cond:
                    self.fetching.discard(uri)
                    self._release(uri)
                    self.known_sizes[uri] = e.size
                if self._evict_for_disk(e.size):
                    log.info("%s: %s; evicted files to make room, trying again", uri, e)
                    with self.cond:
                        if demand:
                            self.demand.appendleft(entry)
                        self._work_changed()
                    continue
                log.error("%s: %s; prefetch paused until space returns", uri, e)
                with self.cond:
                    self.disk_full = True
                    self._disk_need = max(e.size, 1 << 20)
                    if demand:
                        self.demand.appendleft(entry)  # served once space returns
                    else:
                        self.blocked.add(uri)
                continue
            except FetchFailed as e:
                self._fail(uri, e.code, e.reason)
                continue
            except (ChecksumMismatch, ObjectChanged) as e:
                self._fail(uri, type(e).__name__, str(e))
                continue
            except Exception as e:
                log.exception("unexpected error fetching %s", uri)
                self._fail(uri, "InternalError", f"{type(e).__name__}: {e}")
                continue
            self._publish_q.put((entry, fetched))

    def _fail(self, uri: str, code: str, message: str) -> None:
        log.error("failed %s: %s: %s", uri, code, message)
        with self.cond:
            self.fetching.discard(uri)
            self._release(uri)
            self.failed[uri] = (code, message)
            self._early_use.pop(uri, None)
            self.stats["failed"] += 1
            for conn in self.waiters.pop(uri, ()):
                conn.send({"event": "failed", "uri": uri, "code": code, "message": message})
            self._stop_waiting(uri)
            self.cond.notify_all()

    # == publishing ===================================================================================

    def _publish_loop(self) -> None:
        while True:
            first = self._publish_q.get()
            if first is None:
                return
            batch: list[tuple[Entry, Fetched]] = [first]
            stop_after = False
            while len(batch) < 512:
                try:
                    item = self._publish_q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            try:
                self._publish(batch)
            except Exception as e:
                log.exception("publishing %d file(s) failed", len(batch))
                for entry, f in batch:
                    self.store.discard(f.tmp_path)
                    self._fail(entry.uri, "PublishFailed", f"{type(e).__name__}: {e}")
            if stop_after:
                return

    def _publish(self, batch: list[tuple[Entry, Fetched]]) -> None:
        assert self.index is not None
        now = time.time()
        plans: list[tuple[Entry, Fetched, Record]] = []
        planned: set[str] = set()
        for entry, f in batch:
            try:
                rel = self.store.prepare(entry.ref, planned)
            except (OSError, S3CacheError) as e:
                self.store.discard(f.tmp_path)
                self._fail(entry.uri, "PublishFailed", f"{type(e).__name__}: {e}")
                continue
            planned.add(rel)
            rec = Record(PUBLISHING, rel, f.size, f.etag, f.version, f.method, f.crc32c, now, 0.0)
            plans.append((entry, f, rec))
        # The order below is the crash-safety rule (see store.py).
        self.index.put_many((e.uri, rec) for e, _, rec in plans)
        errors = self.store.publish([(f.tmp_path, rec.path) for _, f, rec in plans])
        for (entry, f, _), err in zip(plans, errors):
            if err is not None:
                self.store.discard(f.tmp_path)
                self._fail(entry.uri, "PublishFailed", f"{type(err).__name__}: {err}")
        if any(errors):
            self.index.delete_many(e.uri for (e, _, _), err in zip(plans, errors) if err is not None)
            plans = [p for p, err in zip(plans, errors) if err is None]
        ready = [(e.uri, replace(rec, state=READY)) for e, _, rec in plans]
        self.index.put_many(ready)
        with self.cond:
            for (entry, f, _), (uri, rec) in zip(plans, ready):
                old = self._forget_ready(uri)
                if old is not None and old.path != rec.path:
                    self.store.remove(old.path)
                self._release(uri)
                self.fetching.discard(uri)
                self.failed.pop(uri, None)
                used_at = self._early_use.pop(uri, 0.0)
                if self.waiters.get(uri):
                    used_at = now  # a reader is about to open it: its lease starts now
                if used_at:
                    rec = rec.used(used_at)
                    self._dirty_use[uri] = used_at
                self.ready[uri] = rec
                self.used += rec.size
                self.stats["fetched"] += 1
                self.stats["fetched_bytes"] += rec.size
                for conn in self.waiters.pop(uri, ()):
                    conn.send({"event": "ready", "uri": uri, "path": rec.path})
                self._stop_waiting(uri)
            self.disk_full = False
            self.cond.notify_all()
        for entry, f, rec in plans:
            log.debug("ready %s (%d bytes, %s)", entry.uri, rec.size, rec.method)

    # == readers ======================================================================================

    def _note_use(self, reader: str, uris: list[str], hit: bool) -> None:
        """A reader resolved these URIs; ``hit``: they were there when it first looked, which counts as
        a cache hit in the reader's current epoch (caller holds the lock)."""
        now = time.time()
        n = len(self.catalog)
        moved = False
        for uri in uris:
            rec = self.ready.get(uri)
            if rec is not None:
                self.ready[uri] = rec.used(now)
                self._dirty_use[uri] = now
            elif uri in self.fetching:
                # Renamed into place but not yet marked ready: the reader already has it. Its lease
                # must start now, or the file could be evicted the moment it becomes ready.
                self._early_use[uri] = now
            pos = self.catalog.position(uri)
            epoch = self.tracker.epoch_of(reader)
            if pos is not None:
                epoch = self.tracker.saw(reader, pos, n, now)
                moved = True
            if hit:
                self.stats["hits"] += 1
                self._epoch(epoch)["hits"] += 1
        if moved and (self.prefetch_paused or self.blocked):
            self._resume_prefetch()
        elif moved and self._scan_limited:
            self._work_changed()

    def _epoch(self, epoch: int) -> dict[str, int]:
        return self.epochs.setdefault(epoch, {"hits": 0, "misses": 0})

    def _stop_waiting(self, uri: str) -> None:
        started = self._wanted_at.pop(uri, None)
        if started is not None:
            self.stats["wait_seconds"] += time.monotonic() - started

    def _drain_use(self) -> None:
        """Apply every usage note readers have sent so far (caller holds the lock)."""
        if self.server is None:
            return
        batch: dict[tuple[str, bool], list[str]] = {}
        for reader, kind, uri in self.server.use.drain():
            batch.setdefault((reader, kind == "h"), []).append(uri)
        for (reader, hit), uris in batch.items():
            self._note_use(reader, uris, hit=hit)

    def _use_loop(self) -> None:
        import select

        assert self.server is not None
        while not self.stopping.is_set():
            try:
                r, _, _ = select.select(self.server.use.fds(), [], [], 0.5)
            except (OSError, ValueError):
                with self.lock:  # a reader's connection closed between drain and select
                    self._drain_use()
                continue
            if r:
                with self.lock:
                    self._drain_use()

    def _handle(self, conn: Connection, msg: dict) -> dict:
        op = msg.get("op")
        if op == "want":
            return {"results": self._want(conn, str(msg.get("reader", "")), [str(u) for u in msg.get("uris", [])],
                                          [str(u) for u in msg.get("ahead", [])])}
        if op == "status":
            return {"status": self.status()}
        if op == "verify":
            return {"report": self.verify([str(u) for u in msg.get("uris", [])], bool(msg.get("all")),
                                          bool(msg.get("source")))}
        if op in ("pin", "unpin"):
            return self._pin([str(u) for u in msg.get("uris", [])], op == "pin")
        if op == "hello":
            return {"ok": True, "pid": os.getpid(), "protocol": PROTOCOL}
        return {"error": f"unknown op {op!r}"}

    def _want(self, conn: Connection, reader: str, uris: list[str], ahead: list[str] = ()) -> list[dict]:
        """A reader waits for ``uris`` (they go to the front of the queue) and will soon want ``ahead``.

        ``ahead`` is a hint for objects the manifest does not list (for listed ones the readahead policy
        already knows what comes next): they are queued behind the demand, with no one waiting yet.
        """
        log.debug("want %s (then %d more) from %s", uris, len(ahead), reader)
        results = []
        front: list[Entry] = []
        with self.cond:
            self._drain_use()  # the reader's earlier notes first, so its position moves in order
            self._note_use(reader, uris, hit=False)
            misses = sum(1 for u in uris if u not in self.ready)
            self.stats["misses"] += misses
            self._epoch(self.tracker.epoch_of(reader))["misses"] += misses
            for raw in uris:
                try:
                    ref = parse_uri(raw)
                except S3CacheError as e:
                    results.append({"uri": raw, "state": "invalid", "message": str(e)})
                    continue
                uri = ref.uri
                rec = self.ready.get(uri)
                if rec is not None:
                    if self.store.exists(rec.path):
                        results.append({"uri": uri, "state": "ready", "path": rec.path})
                        continue
                    self._forget_ready(uri)  # removed behind our back: fetch it again
                # A failed object is tried again when a reader asks: the fresh answer comes back
                # pushed on this connection within one request's time.
                self.failed.pop(uri, None)
                entry = self._entry_for(uri)
                if entry is None:
                    entry = Entry(ref)
                    self.extra[uri] = entry
                self.waiters.setdefault(uri, set()).add(conn)
                self._wanted_at.setdefault(uri, time.monotonic())
                if uri not in self.fetching:
                    front.append(entry)
                    self.blocked.discard(uri)
                elif self.fetcher is not None:
                    self.fetcher.promote(uri)  # it was prefetching: now a reader waits on it
                rel = self.store.prepare(ref)
                results.append({"uri": uri, "state": "pending", "watch": os.path.dirname(rel)})
            for e in reversed(front):
                self.demand.appendleft(e)
            for raw in ahead:
                try:
                    ref = parse_uri(raw)
                except S3CacheError:
                    continue
                uri = ref.uri
                if uri in self.ready or uri in self.fetching or uri in self.catalog:
                    continue
                entry = self.extra.setdefault(uri, Entry(ref))
                if entry not in self.demand:
                    self.demand.append(entry)
            self.cond.notify_all()
        return results

    def _on_close(self, conn: Connection) -> None:
        with self.lock:
            for uri in [u for u, cs in self.waiters.items() if conn in cs]:
                self.waiters[uri].discard(conn)
                if not self.waiters[uri]:
                    del self.waiters[uri]

    # == verification =================================================================================

    def verify(self, uris: list[str], everything: bool, source: bool) -> dict:
        """Re-hash cached files against their recorded CRC32C; with ``source``, also ask S3 (HEAD)
        whether each object changed since it was cached. A mismatch is moved to the quarantine folder
        and the object fetched again; a changed object is fetched again. Returns a report."""
        assert self.fetcher is not None
        with self.lock:
            if everything:
                targets = list(self.ready.items())
            else:
                targets = [(u, self.ready[u]) for u in (parse_uri(x).uri for x in uris) if u in self.ready]
                missing = [x for x in uris if parse_uri(x).uri not in self.ready]
        report: dict = {"checked": 0, "ok": 0, "mismatched": [], "changed": [], "gone": [],
                        "not_cached": [] if everything else missing}
        for uri, rec in targets:
            path = self.store.layout.abspath(rec.path)
            try:
                actual = local_crc32c_of(path)
            except FileNotFoundError:
                continue  # evicted meanwhile
            report["checked"] += 1
            if actual != rec.crc32c:
                where = self._withdraw(uri, rec, quarantine=True)
                log.error("verify: %s does not match its recorded CRC32C (%s, expected %s); quarantined at %s",
                          uri, actual, rec.crc32c, where)
                report["mismatched"].append({"uri": uri, "path": rec.path, "quarantined": where})
                continue
            if source:
                entry = self._entry_for(uri) or Entry(parse_uri(uri))
                try:
                    now_is = self.fetcher.describe(entry)
                except FetchFailed as e:
                    report["gone"].append({"uri": uri, "code": e.code})
                    continue
                if (now_is.etag and rec.etag and now_is.etag != rec.etag) or now_is.size != rec.size:
                    self._withdraw(uri, rec, quarantine=False)
                    log.info("verify: %s changed in S3 since it was cached; fetching it again", uri)
                    report["changed"].append({"uri": uri, "etag": now_is.etag, "was": rec.etag})
                    continue
            report["ok"] += 1
        return report

    def _withdraw(self, uri: str, rec: Record, quarantine: bool) -> str | None:
        """Take a file out of readers' reach and fetch the object again. Returns the quarantine path."""
        assert self._lease_fd is not None and self.index is not None
        where = None
        fcntl.flock(self._lease_fd, fcntl.LOCK_EX)
        try:
            with self.cond:
                if self.ready.get(uri) is None or self.ready[uri].path != rec.path:
                    return None  # replaced or evicted meanwhile
                self._forget_ready(uri)
                if quarantine:
                    where = self.store.quarantine(rec.path)
                else:
                    self.store.remove(rec.path)
                self.index.delete_many([uri])
                entry = self._entry_for(uri) or Entry(parse_uri(uri))
                pos = self.catalog.position(uri)
                if pos is not None:
                    self.cursor = min(self.cursor, pos)
                self.demand.append(entry)
                self._work_changed()
        finally:
            fcntl.flock(self._lease_fd, fcntl.LOCK_UN)
        return where

    def _revalidate_loop(self) -> None:
        """``--revalidate``: every so often, ask S3 whether cached manifest objects changed."""
        while not self.stopping.wait(self.s.revalidate):
            with self.lock:
                uris = [u for u in self.ready if u in self.catalog]
            try:
                report = self.verify(uris, False, True)
            except Exception:
                log.exception("revalidation failed")
                continue
            if report["changed"] or report["mismatched"]:
                log.info("revalidated %d file(s): %d changed in S3, %d corrupt", report["checked"],
                         len(report["changed"]), len(report["mismatched"]))

    # == housekeeping =================================================================================

    def _flush_use(self) -> None:
        with self.lock:
            dirty = [(u, self.ready[u]) for u in self._dirty_use if u in self.ready]
            self._dirty_use.clear()
        if dirty and self.index is not None:
            self.index.put_many(dirty)

    def _housekeeping_loop(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self._flush_use()
            except Exception:
                log.exception("flushing usage to the index failed")
            with self.lock:
                self._tp_samples.append((time.monotonic(), self.fetcher.counters.bytes if self.fetcher else 0))
            # Leases expire with time alone, and idle readers are forgotten: either may open up work.
            self._resume_prefetch()
            with self.cond:
                if self._scan_limited:
                    self._work_changed()
            if not os.path.exists(self.store.layout.lock):
                log.error("cache dir %s vanished (deleted or unmounted); stopping", self.store.layout.root)
                self.exit_code = 1
                self.stop()
                return
            if self.disk_full and self.store.free_bytes() >= self._disk_need:
                log.info("space returned on the cache filesystem; fetching resumes")
                with self.cond:
                    self.disk_full = False
                    self._work_changed()

    # == status =======================================================================================

    def status(self) -> dict:
        with self.lock:
            # Proportional to what is cached and in flight, not to the manifest: status must stay fast
            # with a million entries.
            in_manifest_ready = sum(1 for u in self.ready if u in self.catalog)
            failed_in_manifest = sum(1 for u in self.failed if u in self.catalog)
            fetching = len(self.fetching)
            queued = max(0, len(self.catalog) - in_manifest_ready - failed_in_manifest
                         - sum(1 for u in self.fetching if u in self.catalog)) + len(self.demand)
            throughput = 0.0
            if len(self._tp_samples) >= 2:
                (t0, b0), (t1, b1) = self._tp_samples[max(0, len(self._tp_samples) - 11)], self._tp_samples[-1]
                throughput = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
            pinned = [r for u, r in self.ready.items() if self._is_pinned(u)]
            methods: dict[str, int] = {}
            for r in self.ready.values():
                methods[r.method] = methods.get(r.method, 0) + 1
            counters = self.fetcher.counters if self.fetcher else None
            return {
                "cache_dir": self.store.layout.root,
                "pid": os.getpid(),
                "uptime": round(time.time() - self.started_at, 1),
                "manifest": str(self.s.manifest) if self.s.manifest else None,
                "manifest_entries": len(self.catalog),
                "objects": {"queued": queued, "fetching": fetching, "ready": len(self.ready),
                            "failed": len(self.failed)},
                "bytes": {"ready": self.used, "reserved": self.reserved, "max": self.s.max_size,
                          "free_fraction": round(self.store.free_fraction(), 4)},
                "throughput_bytes_per_s": round(throughput),
                "verified_by": methods,
                "failures": [{"uri": u, "code": c, "message": m} for u, (c, m) in list(self.failed.items())[:50]],
                "manifest_errors": self.manifest_errors,
                "prefetch_paused": self.prefetch_paused,
                "disk_full": self.disk_full,
                "pinned": {"files": len(pinned), "bytes": sum(r.size for r in pinned)},
                "readers": len(self.tracker),
                "epochs": [{"epoch": e, **v, "hit_rate": round(v["hits"] / max(1, v["hits"] + v["misses"]), 4)}
                           for e, v in sorted(self.epochs.items())],
                "requests": counters.requests if counters else 0,
                "retries": counters.retries if counters else 0,
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.stats.items()},
            }
