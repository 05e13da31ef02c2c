"""The daemon: the composition root. It builds the parts, wires them, runs their threads and stops them.

The parts, each a module with one job (imports point down this list; a part tells one above it what
happened only through a callable handed to it here):

* ``readers``  — usage notes, wants, waiters, epochs, hit and miss counts;
* ``maintenance`` / ``workers`` — reconcile, rebuild, verify, revalidate / one fetch at a time;
* ``schedule`` / ``publisher`` — what to fetch next / verified temp files become cached files;
* ``space``    — the resident set, reservations, admission, eviction, the filesystem;
* ``manifest_watch`` — read the manifest, watch it, hand each version to ``_install_manifest``.

Threads: workers (``--workers``), the publisher, housekeeping (usage to the index once a second,
throughput samples, leases and idle readers expiring, progress, systemd's STATUS= and WATCHDOG=), the
usage-note reader, the SIGHUP reload, the control server's, the manifest watcher's, and
``--revalidate``'s. Each of ours runs under ``supervise.supervised``: an exception in one iteration is
logged once and counted in status (``loop_errors``), and a thread that dies anyway stops the daemon
with exit code 1, for systemd to restart it.

systemd (``notify``): STATUS= while starting, READY=1 once the cache is reconciled, the index and the
manifest loaded and the control socket serving; STATUS= progress lines; WATCHDOG=1 from housekeeping,
after its state-lock sections (a deadlock stops the keep-alives); RELOADING=1 ... READY=1 around a
SIGHUP reload; STOPPING=1 first thing in ``stop``.

Locks: one state lock, ``self.cond`` (a Condition over an RLock), shared by the space, schedule,
readers and publisher, because a fetch ending changes all of them in one step (see space.py). The
cache's lease ``flock`` is taken only by the space, always before the state lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import notify
from .catalog import Catalog
from .config import Settings, human_size, redact_urls
from .control import PROTOCOL, Connection, Server
from .errors import PermissionDenied
from .evict import ReaderTracker
from .fetch import Fetcher, make_client
from .index import Index, Record
from .maintenance import Maintenance, open_index
from .manifest_watch import ManifestWatch
from .publisher import Publisher
from .readers import Readers
from .errors import S3CacheError
from .metrics import FetchHistogram
from .refs import format_uri, from_identity, shown
from .schedule import Schedule
from .scope import Scope
from .space import Space
from .store import Store
from .supervise import LoopErrors, supervised
from .workers import Workers

log = logging.getLogger("s3cache.daemon")

# Settings a SIGHUP applies to the running daemon; any other that changed waits for a restart.
LIVE_SETTINGS = ("manifest", "max_size", "lease", "readahead", "min_free", "low_watermark", "revalidate",
                 "log_level")
PROGRESS_EVERY = 5.0  # seconds between INFO progress lines (and STATUS= updates) while work is pending


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

    def __init__(self, settings: Settings, *, flags: Mapping[str, Any] | None = None,
                 config_file: Path | None = None) -> None:
        """``flags`` and ``config_file``: what ``serve`` was given, so that SIGHUP re-reads the
        configuration as ``serve`` read it (flags still win over the file and the environment)."""
        self.s = settings
        self._flags = dict(flags or {})
        self._config_file = config_file
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
        self.fetch_histogram = FetchHistogram()  # served by --metrics-addr; recorded by the workers
        self.loop_errors = LoopErrors()
        self.errors_by_code: dict[str, int] = {}
        self.serving = False  # READY was sent: the daemon ran, and says "stopped" when it stops
        self.on_progress: Callable[[dict], None] | None = None  # serve's terminal bar; else log lines
        self._wd = notify.Watchdog()
        self._hup = threading.Event()
        self._manifest_gen = 0  # bumped when SIGHUP replaces the watch: an older watch may not install
        self._manifest_stop: threading.Event | None = None  # the current watch's own stop
        self._revalidate_stop: threading.Event | None = None
        self._progress_sent = (0.0, "")  # (when, line) of the last STATUS= line
        self._progress_logged = 0.0
        self._progress_at = float("-inf")  # when progress was last computed
        self._was_pending = True  # so that a start with nothing to do still logs where it stands

    # == lifecycle ====================================================================================

    def start(self) -> None:
        """Take the cache dir, reconcile, load the manifest and start serving. Raises S3CacheError."""
        notify.status("taking the cache dir")
        self.store.open()
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise
        self.serving = True
        notify.ready(self._progress()["line"])

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
            notify.status(f"reading the manifest {s.manifest}")
            self.manifest = self._new_watch(str(s.manifest))
            catalog = self.manifest.read()
        notify.status("reconciling the cache dir with its index")
        self.index, damaged = open_index(self.store)
        self._wire(self.index, fetcher)
        if damaged:
            self.maintenance.rebuild(catalog)
        else:
            self.maintenance.reconcile(catalog)
        if self.manifest is not None:
            self._install_manifest(catalog)
            # Watch before anyone can see us serving, so an edit made right after start is not missed.
            self._start_watch(self.manifest)
        self._tp_samples.append((time.monotonic(), fetcher.counters.bytes))  # throughput counts from here
        self.server = Server(lay.control_socket, lay.use_socket, self._handle, self.readers.closed,
                             on_crash=self._server_crashed)
        self.server.start()
        self._spawn(self._use_loop, "s3cache-use")
        self._spawn(self.publisher.run, "s3cache-publish")
        self._spawn(self._housekeeping_loop, "s3cache-housekeeping")
        self._spawn(self._reload_loop, "s3cache-reload")
        for i in range(s.workers):
            self._spawn(self.workers.run, f"s3cache-worker-{i}", loop="workers")
        self._start_revalidate(s.revalidate)
        log.info("serving %s: %d manifest entries, %d files ready (%s of %s)", lay.root,
                 len(self.schedule.catalog), len(self.space.ready), human_size(self.space.used),
                 human_size(s.max_size))

    def _wire(self, index: Index, fetcher: Fetcher) -> None:
        """Build the parts bottom up; callables let a lower part report to one built after it."""
        s, store, cond = self.s, self.store, self.cond
        tracker = ReaderTracker(idle=max(s.lease, 60.0))
        self.space = Space(s, store, index, cond, tracker, drain_notes=lambda: self.readers.drain(),
                           on_evicted=lambda victims: self.schedule.evicted(victims))
        self.schedule = Schedule(s, self.space, cond, tracker, self.stopping,
                                 is_waited=lambda uri: self.readers.is_waited(uri))
        self.publisher = Publisher(store, index, self.space, cond, on_published=self._published,
                                   on_failed=self._fail, on_superseded=self.schedule.superseded)
        self.readers = Readers(self.schedule, self.space, store, cond, tracker, notes=self._notes,
                               promote=fetcher.promote, scope=Scope(s.allow, has_manifest=s.manifest is not None))
        self.workers = Workers(s, self.schedule, self.space, fetcher, cond, is_waited=self.readers.is_waited,
                               publish=self.publisher.put, fail=self._fail, histogram=self.fetch_histogram,
                               errors=self.loop_errors)
        self.maintenance = Maintenance(store, index, self.space, self.schedule, cond, describe=fetcher.describe)

    def _spawn(self, target, name: str, *, loop: str | None = None, stopping: threading.Event | None = None) -> None:
        """Run ``target`` on a thread under ``supervised`` (``loop``: its name in ``loop_errors``;
        ``stopping``: the event that ends it, when not the daemon's)."""
        loop = loop or name.removeprefix("s3cache-")
        body = supervised(loop, target, self.loop_errors, stopping or self.stopping, self._thread_died)
        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _thread_died(self, loop: str, why: str) -> None:
        """A thread ended that should not have: say so, and exit non-zero so systemd restarts us."""
        log.critical("the %s thread died (%s); stopping so that the service is restarted", loop, why)
        self.exit_code = 1
        self.stop()

    def stop(self) -> None:
        """Ask every thread to stop; ``wait`` returns once they have."""
        if not self.stopping.is_set() and self.serving:
            notify.stopping("stopping")
        self.stopping.set()
        if self.fetcher is not None:
            self.fetcher.abort()  # a download stalled in a read must not hold shutdown for its read timeout
        for ev in (self._manifest_stop, self._revalidate_stop):
            if ev is not None:
                ev.set()
        self._hup.set()
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
        if self.serving:  # a daemon that never started has nothing to report stopping
            log.info("stopped")

    def run(self) -> int:
        """start(), stop on SIGTERM or SIGINT, clean up, return the exit code. For ``s3cache serve``."""
        # Handlers first: systemd may send SIGTERM while start() is still reconciling or listing.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
            signal.signal(signal.SIGHUP, lambda *_: self._hup.set())
        self.start()
        self.wait()
        return self.exit_code

    # == what one part tells the others ===============================================================

    def _install_manifest(self, catalog: Catalog, gen: int | None = None, path: str | None = None) -> None:
        """Switch to a new manifest. Work is proportional to what is cached, not to the manifest.
        ``gen``: the watch's generation; a watch SIGHUP replaced installs nothing."""
        with self.space.exclusive():  # stale files leave while no reader is between stat and note
            if gen is not None and gen != self._manifest_gen:
                return
            stale = self.space.install(catalog)
            self.readers.install()
            self.schedule.install(catalog)
        if stale:
            log.info("manifest asks for another version, size or checksum of %d cached file(s); fetching again",
                     len(stale))
        log.info("manifest %s: %d entries", path or self.s.manifest, len(catalog))

    def _new_watch(self, path: str) -> ManifestWatch:
        """A watch of ``path`` with its own stop event and the current generation."""
        gen = self._manifest_gen
        self._manifest_stop = threading.Event()
        return ManifestWatch(path, lister=self.fetcher.list, stopping=self._manifest_stop,
                             install=lambda catalog: self._install_manifest(catalog, gen, path),
                             shard=self.s.shard, settle=self.s.manifest_settle)

    def _start_watch(self, watch: ManifestWatch) -> None:
        watch.watch()
        self._spawn(watch.reload_loop, "s3cache-manifest", loop="manifest", stopping=self._manifest_stop)

    def _start_revalidate(self, every: float) -> None:
        if self._revalidate_stop is not None:
            self._revalidate_stop.set()
            self._revalidate_stop = None
        if every > 0:
            stop = self._revalidate_stop = threading.Event()
            self._spawn(lambda: self.maintenance.revalidate_loop(stop, every), "s3cache-revalidate",
                        loop="revalidate", stopping=stop)

    def _published(self, items: list[tuple[str, Record]], now: float) -> None:
        """The publisher made these ready (state lock held)."""
        for uri, _ in items:
            self.schedule.fetched(uri)
        self.readers.landed(items, now)

    def _fail(self, uri: str, code: str, message: str) -> None:
        message = _about(uri, redact_urls(message))
        log.error("failed %s: %s: %s", shown(uri), code, message.replace(uri, shown(uri)))
        with self.cond:
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
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
        refs = [from_identity(u) for u in uris]
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
        if op in ("order", "order_list", "explain"):
            return self.readers.order_op(op, msg, self._throughput())
        return {"error": f"unknown op {op!r}"}

    # == housekeeping and status ======================================================================

    def _housekeeping_loop(self) -> None:
        """Once a second: usage to the index, a throughput sample, expired leases, a vanished cache dir,
        space returning after a full disk; progress; then the watchdog keep-alive, which comes only
        after this iteration's state-lock sections, so a deadlock stops the keep-alives."""
        guard = self.loop_errors.guard
        while not self.stopping.wait(1.0):
            with guard("housekeeping", "writing usage to the index"):
                self.space.flush()
            with self.cond:
                self._tp_samples.append((time.monotonic(), self.fetcher.counters.bytes if self.fetcher else 0))
            with guard("housekeeping", "releasing failures whose backoff passed"):
                self.schedule.retry_due()  # failures whose backoff passed are fetched again
            with guard("housekeeping", "expiring leases and idle readers"):
                # Leases expire with time alone, and idle readers are forgotten: either may open up work.
                self.schedule.reconsider()
            if not os.path.exists(self.store.layout.lock):
                log.error("cache dir %s vanished (deleted or unmounted); stopping", self.store.layout.root)
                self.exit_code = 1
                self.stop()
                return
            with guard("housekeeping", "checking the filesystem for space"):
                if self.space.space_returned():
                    with self.cond:
                        self.schedule.work_changed()
            with guard("housekeeping", "reporting progress"):
                self._report_progress()
            self._wd.kick()

    def _progress(self) -> dict:
        """Where the manifest stands, for STATUS=, the progress log line and serve's bar."""
        with self.cond:
            mb = self._manifest_bytes()
            sched = self.schedule.status()
            catalog = self.schedule.catalog
            done = sum(1 for u in self.space.ready_uris() if u in catalog)
            pending = sched["queued"] + sched["fetching"]
        total = mb["total"] if mb["unknown_sizes"] == 0 else None
        rate = self._throughput()
        line = notify.progress_line(done, len(catalog), mb["ready"], total, rate)
        return {"objects_done": done, "objects_total": len(catalog), "bytes_done": mb["ready"],
                "bytes_total": total, "bytes_per_s": rate, "pending": pending, "failed": sched["failed"],
                "line": line}

    def _report_progress(self) -> None:
        """STATUS= when the line changed (at most every PROGRESS_EVERY s); an INFO line every
        PROGRESS_EVERY s while work is pending and once when it is done (unless serve draws a bar)."""
        now = time.monotonic()
        when, last = self._progress_sent
        # Progress costs a pass over the ready files: once per PROGRESS_EVERY, unless a bar is drawn.
        if self.on_progress is None and now - self._progress_at < PROGRESS_EVERY:
            return
        self._progress_at = now
        p = self._progress()
        if p["line"] != last and (now - when >= PROGRESS_EVERY or not p["pending"]):
            notify.status(p["line"])
            self._progress_sent = (now, p["line"])
        if self.on_progress is not None:
            self.on_progress(p)
        elif p["pending"] and now - self._progress_logged >= PROGRESS_EVERY or self._was_pending and not p["pending"]:
            log.info("progress: %s%s", p["line"], f", {p['failed']} failed" if p["failed"] else "")
            self._progress_logged = now
        self._was_pending = bool(p["pending"])

    def _manifest_bytes(self) -> dict:
        """``manifest_bytes`` of status (state lock held): the manifest's bytes whose size is known (given
        by the manifest or learned from S3), those ready, and the entries whose size is still unknown.
        Proportional to what is cached and known, not to the manifest."""
        catalog = self.schedule.catalog
        total, unknown, ready = catalog.total_size, len(catalog) - catalog.sized, 0
        learned: set[str] = set()
        for uri, rec in self.space.records():
            pos = catalog.position(uri)
            if pos is None:
                continue
            ready += rec.size
            if not catalog.has_size(pos):
                total += rec.size
                unknown -= 1
                learned.add(uri)
        for uri, size in self.space.known_sizes.items():
            pos = catalog.position(uri)
            if pos is not None and uri not in learned and not catalog.has_size(pos):
                total += size
                unknown -= 1
        return {"total": total, "ready": ready, "unknown_sizes": max(0, unknown)}

    # == SIGHUP: configuration and manifest again =====================================================

    def _reload_loop(self) -> None:
        while True:
            self._hup.wait()
            if self.stopping.is_set():
                return
            self._hup.clear()
            self.reload()

    def reload(self) -> None:
        """Re-read the configuration (as serve read it) and the manifest, keeping the cache and readers.
        Settings that cannot change live are logged as needing a restart; a bad configuration keeps
        the running one and says why."""
        from .config_sources import load

        notify.reloading()
        log.info("reloading the configuration and the manifest (SIGHUP)")
        try:
            new = load(self._flags, config=self._config_file).settings
        except S3CacheError as e:
            log.error("configuration not reloaded, keeping the running one: %s", e)
            notify.ready(f"reload failed: {e}".replace("\n", " "))
            return
        old = self.s
        later = [o.name for o in dataclasses.fields(Settings)
                 if o.name not in LIVE_SETTINGS and getattr(new, o.name) != getattr(old, o.name)]
        if later:
            log.warning("changed settings that take effect only after a restart: %s", ", ".join(later))
        merged = dataclasses.replace(old, **{k: getattr(new, k) for k in LIVE_SETTINGS})
        with self.cond:
            self.s = merged
            for part in (self.space, self.schedule, self.workers):
                part.s = merged
        logging.getLogger().setLevel(merged.log_level.upper())
        if merged.revalidate != old.revalidate:
            self._start_revalidate(merged.revalidate)
        try:
            self._reload_manifest()
        except S3CacheError as e:
            log.error("manifest not reloaded, keeping the previous one: %s", e)
            notify.ready(f"manifest not reloaded: {e}".replace("\n", " "))
            return
        with self.cond:
            self.schedule.work_changed()
            self.cond.notify_all()
        notify.ready(self._progress()["line"])

    def _reload_manifest(self) -> None:
        """A fresh watch of the (possibly new) manifest path replaces the old one, whose installs are
        ignored from now on; the new manifest is read and installed before the reload completes."""
        path = self.s.manifest
        old, old_stop = self.manifest, self._manifest_stop
        with self.cond:
            self._manifest_gen += 1
        if old is not None:
            old_stop.set()
            old.wake()
            old.stop()
        self.manifest = None
        if path is None:
            self._install_manifest(Catalog(), self._manifest_gen, "(none)")
            return
        watch = self._new_watch(str(path))
        catalog = watch.read()
        self.manifest = watch
        self._install_manifest(catalog, self._manifest_gen, str(path))
        self._start_watch(watch)

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
                "failures": [{**f, "message": redact_urls(f["message"])} for f in sched["failures"]],
                "failed_permanent": sched["failed_permanent"],
                "failed_retrying": sched["failed_retrying"],
                "next_retry_in": sched["next_retry_in"],
                "retries_released": sched["retries_released"],
                "hints": sched["hints"],
                "manifest_errors": [redact_urls(e) for e in self.manifest.errors] if self.manifest else [],
                "unverified": self.maintenance.status()["unverified"],
                **(self.manifest.status() if self.manifest else {}),
                "prefetch_paused": sched["prefetch_paused"],
                "prefetch_yields_to": sched["prefetch_yields_to"],
                "disk_full": space["disk_full"],
                "min_free_reached": space["min_free_reached"],
                "leases": space["leases"],
                "waiting_for_space": space["waiting_for_space"],
                "pinned": space["pinned"],
                "readers": readers["readers"],
                "epochs": readers["epochs"],
                "waiting": readers["waiting"],
                "notes_rejected": readers["notes_rejected"],
                "out_of_scope": {"wants": self.readers.out_of_scope, "hints": self.readers.hints_out_of_scope},
                "requests": counters.requests if counters else 0,
                "retries": counters.retries if counters else 0,
                "sockets": self.server.counters() if self.server is not None else {},
                "errors_by_code": dict(self.errors_by_code),
                "disk_full_pauses": self.workers.disk_full_pauses,
                "manifest_bytes": self._manifest_bytes(),
                "loop_errors": self.loop_errors.status(),
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()},
            }


def _about(uri: str, message: str) -> str:
    """``message`` without a leading ``uri: `` (errors name their object; the failure is reported beside
    the URI already, and "failed s3://x: ChecksumMismatch: s3://x: ..." said it twice)."""
    for form in (uri, shown(uri), format_uri(uri)):
        if message.startswith(form + ": "):
            return message[len(form) + 2:]
    return message
