"""The daemon: the composition root. It builds the parts, wires them, runs their threads and stops them.

The parts, each a module with one job (imports point down this list; a part tells one above it what
happened only through a callable handed to it here):

* ``readers``  — usage notes, wants, waiters, epochs, hit and miss counts;
* ``maintenance`` / ``workers`` — reconcile, rebuild, verify, revalidate / one fetch at a time;
* ``schedule`` / ``publisher`` — what to fetch next / verified temp files become cached files;
* ``space``    — the resident set, reservations, admission, eviction, the filesystem;
* ``manifest_watch`` — read the manifest, watch it, hand each version to ``_install_manifest``.

Threads: workers (``--workers``), the publisher, housekeeping (usage to the index once a second,
throughput samples, leases and idle readers expiring), the usage-note reader, the control server's, the
manifest watcher's, and ``--revalidate``'s.

Locks: one state lock, ``self.cond`` (a Condition over an RLock), shared by the space, schedule,
readers and publisher, because a fetch ending changes all of them in one step (see space.py). The
cache's lease ``flock`` is taken only by the space, always before the state lock.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import threading
import time
from collections import deque

from .catalog import Catalog
from .config import Settings, human_size
from .control import PROTOCOL, Connection, Server
from .errors import PermissionDenied
from .evict import ReaderTracker
from .fetch import Fetcher, make_client
from .index import Index, Record
from .maintenance import Maintenance, open_index
from .manifest_watch import ManifestWatch
from .publisher import Publisher
from .readers import Readers
from .refs import parse_uri
from .schedule import Schedule
from .scope import Scope
from .space import Space
from .store import Store
from .workers import Workers

log = logging.getLogger("s3cache.daemon")


def _peer_uid(conn: Connection) -> int | None:
    """The uid of the process at the other end of a control connection (None if unknown). Uses the
    Connection's own attribute when the socket server provides one, else asks the kernel."""
    uid = getattr(conn, "peer_uid", None)
    if uid is not None:
        return uid
    try:
        creds = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", creds)[1]


TP_WINDOW = 10.0  # seconds of arrivals the throughput figure averages over


class Daemon:
    """Invariant: the parts exist from the end of ``_start`` until ``_teardown``; the server, which
    lets readers in, starts only after the cache is reconciled and the manifest installed."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.store = Store(str(settings.cache_dir), world_readable=settings.world_readable)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.index: Index | None = None
        self.server: Server | None = None
        self.fetcher: Fetcher | None = None
        self.manifest: ManifestWatch | None = None
        # The parts, built by _wire once the index is open.
        self.space: Space | None = None
        self.schedule: Schedule | None = None
        self.publisher: Publisher | None = None
        self.readers: Readers | None = None
        self.workers: Workers | None = None
        self.maintenance: Maintenance | None = None
        self._threads: list[threading.Thread] = []
        self._tp_samples: deque[tuple[float, int]] = deque(maxlen=64)
        self.exit_code = 0
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
        s, lay = self.s, self.store.layout
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run", removed)
        client = make_client(s.endpoint_url, s.region, pool=s.workers * 2 + 4,
                             connect_timeout=s.connect_timeout, read_timeout=s.read_timeout)
        self.fetcher = fetcher = Fetcher(client, part_size=s.part_size, prefetch_part_size=s.prefetch_part_size,
                                         workers=s.workers, max_attempts=s.max_attempts, cancel=self.stopping,
                                         new_temp=self.store.new_temp, discard=self.store.discard,
                                         require_checksum=s.require_checksum)
        catalog = Catalog()
        if s.manifest is not None:
            self.manifest = ManifestWatch(str(s.manifest), lister=fetcher.list, install=self._install_manifest,
                                          stopping=self.stopping, shard=s.shard, settle=s.manifest_settle)
            catalog = self.manifest.read()
        self.index, damaged = open_index(self.store)
        self._wire(self.index, fetcher)
        if damaged:
            self.maintenance.rebuild(catalog)
        else:
            self.maintenance.reconcile(catalog)
        if self.manifest is not None:
            self._install_manifest(catalog)
            # Watch before anyone can see us serving, so an edit made right after start is not missed.
            self.manifest.watch()
            self._spawn(self.manifest.reload_loop, "s3cache-manifest")
        self._tp_samples.append((time.monotonic(), fetcher.counters.bytes))  # throughput counts from here
        self.server = Server(lay.control_socket, lay.use_socket, self._handle, self.readers.closed,
                             on_crash=self._server_crashed)
        self.server.start()
        self._spawn(self._use_loop, "s3cache-use")
        self._spawn(self.publisher.run, "s3cache-publish")
        self._spawn(self._housekeeping_loop, "s3cache-housekeeping")
        for i in range(s.workers):
            self._spawn(self.workers.run, f"s3cache-worker-{i}")
        if s.revalidate > 0:
            self._spawn(lambda: self.maintenance.revalidate_loop(self.stopping, s.revalidate), "s3cache-revalidate")
        log.info("serving %s: %d manifest entries, %d files ready (%s of %s)", lay.root,
                 len(self.schedule.catalog), len(self.space.ready), human_size(self.space.used),
                 human_size(s.max_size))

    def _wire(self, index: Index, fetcher: Fetcher) -> None:
        """Build the parts bottom up; callables let a lower part report to one built after it."""
        s, store, cond = self.s, self.store, self.cond
        tracker = ReaderTracker(idle=max(s.lease, 60.0))
        self.space = Space(s, store, index, cond, tracker, drain_notes=lambda: self.readers.drain(),
                           on_evicted=lambda positions: self.schedule.evicted(positions))
        self.schedule = Schedule(s, self.space, cond, tracker, self.stopping,
                                 is_waited=lambda uri: self.readers.is_waited(uri))
        self.publisher = Publisher(store, index, self.space, cond, on_published=self._published,
                                   on_failed=self._fail, on_superseded=self.schedule.superseded)
        self.readers = Readers(self.schedule, self.space, store, cond, tracker, notes=self._notes,
                               promote=fetcher.promote, scope=Scope(s.allow, has_manifest=s.manifest is not None))
        self.workers = Workers(s, self.schedule, self.space, fetcher, cond, is_waited=self.readers.is_waited,
                               publish=self.publisher.put, fail=self._fail)
        self.maintenance = Maintenance(store, index, self.space, self.schedule, cond, describe=fetcher.describe)

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Ask every thread to stop; ``wait`` returns once they have."""
        self.stopping.set()
        if self.manifest is not None:
            self.manifest.wake()
        with self.cond:
            self.cond.notify_all()

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass
        self._teardown()

    def _teardown(self) -> None:
        self.stop()
        if self.manifest is not None:
            self.manifest.stop()
        if self.publisher is not None:
            self.publisher.stop()
        for t in self._threads:
            t.join(timeout=10)
        if self.server is not None:
            self.server.stop()
        if self.fetcher is not None:
            self.fetcher.close()
        try:
            if self.space is not None:
                self.space.flush()
            self.store.clean_tmp()
        except OSError as e:  # the cache dir may have vanished under us
            log.error("could not clean up %s: %s", self.store.layout.root, e.strerror)
        if self.index is not None:
            try:
                self.index.close()
            except Exception:
                pass
        if self.space is not None:
            self.space.close()
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

    # == what one part tells the others ===============================================================

    def _install_manifest(self, catalog: Catalog) -> None:
        """Switch to a new manifest. Work is proportional to what is cached, not to the manifest."""
        with self.space.exclusive():  # stale files leave while no reader is between stat and note
            stale = self.space.install(catalog)
            self.readers.install()
            self.schedule.install(catalog)
        if stale:
            log.info("manifest asks for another version, size or checksum of %d cached file(s); fetching again",
                     len(stale))
        log.info("manifest %s: %d entries", self.s.manifest, len(catalog))

    def _published(self, items: list[tuple[str, Record]], now: float) -> None:
        """The publisher made these ready (state lock held)."""
        for uri, _ in items:
            self.schedule.fetched(uri)
        self.readers.landed(items, now)

    def _fail(self, uri: str, code: str, message: str) -> None:
        log.error("failed %s: %s: %s", uri, code, message)
        with self.cond:
            self.schedule.fail(uri, code, message)
            self.space.release(uri)
            self.readers.failed(uri, code, message)
            self.cond.notify_all()

    def _pin(self, conn: Connection, uris: list[str], pin: bool) -> dict:
        """``s3cache pin/unpin``: keep files resident (fetching them now) or release them.

        Only the daemon's own user or root may pin or unpin (SO_PEERCRED of the control connection):
        pins outlive the job that made them and take cache space from every other reader. Replies
        ``{"ok", "pinned": every pinned URI counted once, "results": [{"uri", "outcome"}]}`` (outcomes:
        see Space.pin); raises PermissionDenied, PinQuotaExceeded or UnsafeKey, changing nothing."""
        uid = _peer_uid(conn)
        if uid is None or uid not in (0, os.geteuid()):
            raise PermissionDenied(
                f"uid {'unknown' if uid is None else uid} may not {'pin' if pin else 'unpin'}: pins need the daemon's user "
                f"(uid {os.geteuid()}) or root, as they hold cache space against every reader")
        refs = [parse_uri(u) for u in uris]
        with self.cond:
            results = self.space.pin([r.uri for r in refs], pin)
            if pin:
                for ref in refs:
                    self.schedule.fetch_soon(ref)
            self.schedule.work_changed()
            return {"ok": True, "pinned": self.space.pin_count(), "results": results}

    # == readers' sockets =============================================================================

    def _notes(self):
        return self.server.use.drain() if self.server is not None else ()

    def _server_crashed(self, exc: BaseException) -> None:
        """The sockets' I/O thread kept crashing: readers can no longer reach us. Stop with an error so
        systemd restarts the daemon, rather than serve on deaf."""
        log.error("the control server failed for good (%s: %s); stopping so the service is restarted",
                  type(exc).__name__, exc)
        self.exit_code = 1
        self.stop()

    def _use_loop(self) -> None:
        assert self.server is not None
        while not self.stopping.is_set():
            if self.server.use.wait(0.5):
                with self.cond:
                    self.readers.drain()

    def _handle(self, conn: Connection, msg: dict) -> dict:
        op = msg.get("op")
        if op == "want":
            results = self.readers.want(conn, str(msg.get("reader", "")), [str(u) for u in msg.get("uris", [])],
                                        [str(u) for u in msg.get("ahead", [])])
            if self.manifest is not None:  # fetched on demand: count those of other hosts' shares
                self.manifest.demanded(r["uri"] for r in results if r["state"] == "pending")
            return {"results": results}
        if op == "status":
            return {"status": self.status()}
        if op == "verify":
            return {"report": self.maintenance.verify([str(u) for u in msg.get("uris", [])], bool(msg.get("all")),
                                                      bool(msg.get("source")))}
        if op in ("pin", "unpin"):
            return self._pin(conn, [str(u) for u in msg.get("uris", [])], op == "pin")
        if op == "hello":
            return {"ok": True, "pid": os.getpid(), "protocol": PROTOCOL}
        return {"error": f"unknown op {op!r}"}

    # == housekeeping and status ======================================================================

    def _housekeeping_loop(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.space.flush()
            except Exception:
                log.exception("flushing usage to the index failed")
            with self.cond:
                self._tp_samples.append((time.monotonic(), self.fetcher.counters.bytes if self.fetcher else 0))
                self.schedule.retry_due()  # failures whose backoff passed are fetched again
            # Leases expire with time alone, and idle readers are forgotten: either may open up work.
            self.schedule.reconsider()
            if not os.path.exists(self.store.layout.lock):
                log.error("cache dir %s vanished (deleted or unmounted); stopping", self.store.layout.root)
                self.exit_code = 1
                self.stop()
                return
            if self.space.space_returned():
                with self.cond:
                    self.schedule.work_changed()

    def _throughput(self) -> float:
        """Bytes/s that arrived over the last ~10 s, up to now: the byte counter read now against the
        oldest sample in that window (samples are taken once a second from start, the first at 0
        bytes), so a burst shorter than a sampling interval still shows."""
        now = time.monotonic()
        current = self.fetcher.counters.bytes if self.fetcher else 0
        base = None
        for t, b in self._tp_samples:
            if t >= now - TP_WINDOW:
                base = (t, b)
                break
        if base is None:
            return 0.0
        t0, b0 = base
        return (current - b0) / max(now - t0, 1.0)

    def status(self) -> dict:
        """Assembled from each part's report, in one hold of the state lock (a consistent picture)."""
        with self.cond:
            sched, space, readers = self.schedule.status(), self.space.status(), self.readers.status()
            published = self.publisher.status()
            counters = self.fetcher.counters if self.fetcher else None
            stats = {**published, "evicted": space["evicted"], "evicted_bytes": space["evicted_bytes"],
                     "hits": readers["hits"], "misses": readers["misses"],
                     "failures_total": sched["failures_total"], "wait_seconds": readers["wait_seconds"]}
            return {
                "cache_dir": self.store.layout.root,
                "pid": os.getpid(),
                "uptime": round(time.time() - self.started_at, 1),
                "manifest": str(self.s.manifest) if self.s.manifest else None,
                "manifest_entries": sched["manifest_entries"],
                "objects": {"queued": sched["queued"], "fetching": sched["fetching"], "ready": space["ready"],
                            "failed": sched["failed"]},
                "bytes": space["bytes"],
                "throughput_bytes_per_s": round(self._throughput()),
                "verified_by": space["verified_by"],
                "failures": sched["failures"],
                "failed_permanent": sched["failed_permanent"],
                "failed_retrying": sched["failed_retrying"],
                "next_retry_in": sched["next_retry_in"],
                "retries_released": sched["retries_released"],
                "hints": sched["hints"],
                "manifest_errors": self.manifest.errors if self.manifest else [],
                "unverified": self.maintenance.status()["unverified"],
                **(self.manifest.status() if self.manifest else {}),
                "prefetch_paused": sched["prefetch_paused"],
                "disk_full": space["disk_full"],
                "pinned": space["pinned"],
                "readers": readers["readers"],
                "epochs": readers["epochs"],
                "waiting": readers["waiting"],
                "notes_rejected": readers["notes_rejected"],
                "requests": counters.requests if counters else 0,
                "retries": counters.retries if counters else 0,
                "sockets": self.server.counters() if self.server is not None else {},
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()},
            }
