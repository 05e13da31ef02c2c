"""The daemon: the composition root. It builds the parts, wires them, runs their threads and stops them.

The parts, each a module with one job (imports point down this list; a part tells one above it what
happened only through a callable handed to it here):

* ``readers``  — usage notes, wants, waiters, epochs, hit and miss counts;
* ``maintenance`` / ``workers`` — reconcile, rebuild, verify, revalidate / one fetch at a time;
* ``schedule`` / ``publisher`` — what to fetch next / verified temp files become cached files;
* ``space``    — the resident set, reservations, admission, eviction, the filesystem;
* ``manifest_watch`` — read the manifest, watch it, hand each version to ``reload.Manifests.install``;
* ``reload``   — the manifest in force, and SIGHUP (configuration and manifest again);
* ``status``   — ``status`` assembled from the parts' reports, throughput, progress lines;
* ``ops``      — the control socket's requests, each routed to the part that answers it; who may pin.

What is left here: the daemon's state and lifecycle (``start``, ``stop``, ``wait``, ``run``), its
threads (``_spawn``), the callables through which parts report to each other (``_published``,
``_fail``), and housekeeping. Start-up (building, wiring and starting the parts) is startup.py's,
teardown (stopping the threads, closing in order) teardown.py's; the control socket's requests are
answered by ``ops.Ops``.

Threads: workers (``--workers``), the publisher, housekeeping (usage to the index once a second,
throughput samples, leases and idle readers expiring, progress, systemd's STATUS= and WATCHDOG=), the
usage-note reader, the SIGHUP reload, the control server's, the manifest watcher's, and
``--revalidate``'s; and the parts' own (the verifier, the signals thread, the starting keep-alive,
the peer listener), started through ``self.supervisor``. Each runs under ``supervise.supervised``: an
exception in one iteration is logged once and counted in status (``loop_errors``), and a thread that
dies anyway stops the daemon with exit code 1, for systemd to restart it.

systemd (``notify``): STATUS= and EXTEND_TIMEOUT_USEC= while starting (starting.py), READY=1 once the
cache is reconciled, the index and the manifest loaded and the parts answer the control socket; STATUS= progress lines; WATCHDOG=1 from housekeeping,
after its state-lock sections (a deadlock stops the keep-alives); RELOADING=1 ... READY=1 around a
SIGHUP reload; STOPPING=1 first thing in ``stop``.

Locks: one state lock, ``self.cond`` (a Condition over an RLock), shared by the space, schedule,
readers and publisher, because a fetch ending changes all of them in one step (see space.py). The
cache's lease ``flock`` is taken only by the space, always before the state lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s3cache.fetch.fetcher import Fetcher
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.refs import format_uri, shown
from s3cache.policy.tracker import ReaderTracker
from s3cache.service import notify
from s3cache.service.config import Settings, redact_urls
from s3cache.service.metrics import FetchHistogram
from s3cache.sockets.control import Server
from s3cache.store.files import Store
from s3cache.store.index import Index, Record

from .maintenance import Maintenance
from .ops import Ops
from .publisher import Publisher
from .readers import Readers
from .reload import Manifests, Reload
from .schedule import Schedule
from .signals import Signals
from .space import Space
from .starting import Starting
from .startup import reader_idle, start_up, wire
from .status import Progress, Throughput, assemble, measure
from .supervise import LoopErrors, Supervisor
from .teardown import tear_down
from .workers import Workers

if TYPE_CHECKING:  # the peer tier is loaded only with --peers (startup.py): ~3 ms of every other start
    from .peering import Peering

log = logging.getLogger("s3cache.daemon")


class Daemon:
    """Invariant: the parts exist from the end of ``_start`` until ``_teardown``. The server opens as
    soon as the cache dir is taken, but its requests reach the parts (``_ops``) only once the cache is
    reconciled, the manifest installed and every thread running; until then ``starting.Starting``
    answers them (readers wait, status names the step)."""

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
        self.manifests: Manifests | None = None  # the manifest in force (built by _start)
        self._reload: Reload | None = None
        # The parts, built by _wire once the index is open.
        self.space: Space | None = None
        self.schedule: Schedule | None = None
        self.publisher: Publisher | None = None
        self.readers: Readers | None = None
        self.workers: Workers | None = None
        self.maintenance: Maintenance | None = None
        self.peering: Peering | None = None  # --peers: the workers fetch through it, peers are served
        self._ops: Ops | None = None  # answers the control socket once serving (before: _starting)
        self.loop_errors = LoopErrors()
        # Every loop of ours, the parts' own included, runs under it (counted in loop_errors).
        self.supervisor = Supervisor(self.loop_errors, self.stopping, self._thread_died)
        self._starting = Starting(str(self.store.layout.root),
                                  str(settings.manifest_source) if settings.manifest_source else None,
                                  supervisor=self.supervisor)
        self._tracker: ReaderTracker | None = None  # where each reader is (space, schedule, readers share it)
        self._threads: list[threading.Thread] = []
        self.throughput = Throughput(lambda: self.fetcher.counters.bytes if self.fetcher else 0)
        self._progress_report = Progress()
        self.exit_code = 0
        self.started_at = time.time()
        self.fetch_histogram = FetchHistogram()  # served by --metrics-addr; recorded by the workers
        self.errors_by_code: dict[str, int] = {}
        self.serving = False  # READY was sent: the daemon ran, and says "stopped" when it stops
        self.on_progress: Callable[[dict], None] | None = None  # serve's terminal bar; else log lines
        self._wd = notify.Watchdog()
        self._hup = threading.Event()
        self._revalidate_stop: threading.Event | None = None

    # == lifecycle ====================================================================================

    def start(self) -> None:
        """Take the cache dir, open its sockets (answering "starting", see starting.py), reconcile,
        load the manifest and start serving. Raises S3CacheError."""
        starting = self._starting
        starting.keep_alive()
        try:
            starting.step("taking the cache dir")
            self.store.open()
            try:
                lay = self.store.layout
                self.server = Server(lay.control_socket, lay.use_socket, self._handle, self._closed,
                                     on_crash=self._server_crashed)
                self.server.start()
                self._start()
            except BaseException:
                self._teardown()
                raise
            self.serving = True
            notify.ready(self._progress()["line"])
        finally:
            starting.finish()

    def _handle(self, conn, msg: dict) -> dict:
        """The control socket's handler: the parts' answers (``Ops``) once serving, else "starting"."""
        ops = self._ops
        return ops.handle(conn, msg) if ops is not None else self._starting.answer(conn, msg)

    def _closed(self, conn) -> None:
        if self._ops is not None:
            self.readers.closed(conn)

    def _start(self) -> None:
        start_up(self)

    def _wire(self, index: Index, fetcher: Fetcher) -> None:
        """Build the parts bottom up (startup.wire); the model tests build a daemon this way."""
        wire(self, index, fetcher)

    def _spawn(self, target, name: str, *, loop: str | None = None,
               stopping: threading.Event | None = None) -> threading.Thread:
        """Run ``target`` on a thread under ``supervised`` (``loop``: its name in ``loop_errors``;
        ``stopping``: the event that ends it, when not the daemon's); teardown waits for it."""
        t = self.supervisor.start(name, target, loop=loop, stopping=stopping)
        self._threads.append(t)
        return t

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
        if self._revalidate_stop is not None:
            self._revalidate_stop.set()
        self._hup.set()
        if self.manifests is not None:
            self.manifests.stop()
        with self.cond:
            self.cond.notify_all()

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass
        self._teardown()

    def _teardown(self) -> None:
        tear_down(self)

    def run(self) -> int:
        """start(), stop on SIGTERM or SIGINT, clean up, return the exit code. For ``s3cache serve``."""
        # Handlers first: systemd may send SIGTERM while start() is still reconciling or listing.
        signals = Signals(on_stop=self.stop, on_hup=self._hup.set, supervisor=self.supervisor)
        if threading.current_thread() is threading.main_thread():
            signals.install()
        try:
            self.start()
            self.wait()
        finally:
            signals.close()
        return self.exit_code

    # == what one part tells the others ===============================================================

    def _install_parts(self, catalog: Catalog) -> Collection[str]:
        """A manifest version into the parts (``Manifests.install`` holds the lease and state locks);
        returns the stale URIs the space dropped."""
        moved = self.schedule.catalog.moved(catalog)  # readers' positions and orders carry over
        stale = self.space.install(catalog)
        self.readers.install(catalog.jobs, moved)
        self.schedule.install(catalog)
        self.readers.rejudge_parked(expire=False)  # wants that waited for this edit of the scope
        return stale

    def _manifest_edited(self) -> bool:
        """Whether the manifest on disk is not the one installed (an edit is on its way in)."""
        return bool(self.manifests and self.manifests.watch and self.manifests.watch.edited())

    def _apply_settings(self, merged: Settings) -> None:
        """SIGHUP's new live settings, to the daemon and the parts that read them (state lock held)."""
        self.s = merged
        self.space.apply(merged)  # with the copies its leases hold (duration, budget)
        self.schedule.s = self.workers.s = merged
        self._tracker.idle = reader_idle(merged)

    def reload(self) -> None:
        """What SIGHUP does (``Reload.reload``): the configuration and the manifest again."""
        self._reload.reload()

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
        # While S3 is unreachable the fetcher says so once a minute; one line per object giving up on
        # it would bury that (hundreds a minute with many objects).
        quiet = self.fetcher is not None and self.fetcher.policy.outage.explains(code)
        log.log(logging.DEBUG if quiet else logging.ERROR, "failed %s: %s: %s", shown(uri), code,
                message.replace(uri, shown(uri)))
        with self.cond:
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
            replacing = uri in self.schedule.replacing  # its cached copy is known to be superseded
            charged = self.schedule.fail(uri, code, message)
            self.space.release(uri)
            if charged is not None:
                self.readers.failed(uri, code, message)
            else:  # the fetch used an entry a reload has since changed: readers wait for the new one
                log.info("%s: that fetch used an entry the manifest has changed since; fetching it again as "
                         "the manifest now describes it", shown(uri))
            self.cond.notify_all()
        if replacing and charged is not None and charged.permanent:
            self.maintenance.retire_superseded(uri, code, shown(uri))

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
                self.throughput.sample()
            with guard("housekeeping", "releasing failures whose backoff passed"):
                self.schedule.retry_due()  # failures whose backoff passed are fetched again
            with guard("housekeeping", "judging wants that wait for a manifest edit"):
                self.readers.expire_parked()
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
                self._progress_report.report(self._progress, self.on_progress)
            self._wd.kick()

    def _progress(self) -> dict:
        """Where the manifest stands, for STATUS=, the progress log line and serve's bar."""
        return measure(self.cond, self.schedule, self.space, self.throughput.rate)

    def status(self) -> dict:
        """Assembled from each part's report, in one hold of the state lock (a consistent picture); while
        starting, the step it is at (starting.py)."""
        if self._ops is None:
            return self._starting.status()
        peers = self.peering.status() if self.peering is not None else None  # its own locks, not ours
        with self.cond:
            st = assemble(root=self.store.layout.root, started_at=self.started_at,
                          manifest=str(self.s.manifest_source) if self.s.manifest_source else None,
                          schedule=self.schedule,
                          space=self.space, readers=self.readers, publisher=self.publisher,
                          maintenance=self.maintenance, workers=self.workers,
                          watch=self.manifests.watch if self.manifests else None, server=self.server,
                          counters=self.fetcher.counters if self.fetcher else None,
                          errors_by_code=self.errors_by_code, loop_errors=self.loop_errors,
                          throughput=self.throughput.rate())
        if peers is not None:
            st["peers"] = peers
        return st


def _about(uri: str, message: str) -> str:
    """``message`` without a leading ``uri: `` (errors name their object; the failure is reported beside
    the URI already, and "failed s3://x: ChecksumMismatch: s3://x: ..." said it twice)."""
    for form in (uri, shown(uri), format_uri(uri)):
        if message.startswith(form + ": "):
            return message[len(form) + 2:]
    return message
