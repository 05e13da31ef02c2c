"""The daemon's start-up: from a cache dir just taken to every part built, wired and running.

``start_up(d)`` runs on the starting thread after root.py's ``Daemon.start`` took the cache dir and
opened its sockets (which answer "starting" meanwhile, see starting.py). In order: temp files of an
interrupted run removed; the index opened (set aside when damaged) on a thread of its own while the
fetcher and the peer tier are built and the manifest read (its prefix lines listed); the cache dir
reconciled with the index (or the index rebuilt when damaged);
``wire`` builds the parts bottom up; the manifest installed; the workers and the publisher started (the
first GETs leave here); the manifest watched; the other threads started; and last ``d._ops`` set, from
which moment requests reach the parts.

Contract: on return every part exists, every thread runs and the daemon answers as serving; on an
exception (an S3CacheError for bad settings, a manifest or a cache dir it cannot use) nothing here is
undone: the caller tears down (teardown.py), which copes with any prefix of these steps having run.
The parts are the daemon's attributes (``d.space``, ``d.schedule``, ...), as root.py's other methods and
the status read them there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.scope import Scope
from s3cache.policy.tracker import ReaderTracker
from s3cache.service.config import Settings, human_size
from s3cache.store.index import Index

from .maintenance import Maintenance, open_index
from .ops import Ops
from .publisher import Publisher
from .readers import Readers
from .reload import Manifests, Reload
from .schedule import Schedule
from .space import Space
from .workers import Workers

if TYPE_CHECKING:
    from .root import Daemon

log = logging.getLogger("s3cache.daemon")


def start_up(d: Daemon) -> None:
    """Build, wire and start the parts of ``d`` (see the module doc). Raises S3CacheError."""
    s, lay = d.s, d.store.layout
    removed = d.store.clean_tmp()
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", removed)
    # The index opens (and is recovered when damaged) on a thread of its own while the S3 client is built
    # and the manifest read: it mostly waits on fdatasyncs (~40 on a new cache dir, 16 on one in use:
    # 12-80 ms here), the client is ~40 ms of CPU. Nothing uses the index before it is joined below.
    opening = _OnThread(lambda: open_index(d.store), "s3cache-open-index")
    try:
        client = make_client(s.endpoint_url, s.region, pool=s.workers * 2 + 4,
                             connect_timeout=s.connect_timeout, read_timeout=s.read_timeout)
        d.fetcher = fetcher = Fetcher(client, part_size=s.part_size, prefetch_part_size=s.prefetch_part_size,
                                      workers=s.workers, max_attempts=s.max_attempts, cancel=d.stopping,
                                      new_temp=d.store.new_temp, discard=d.store.discard,
                                      require_checksum=s.require_checksum, transport=s.transport)
        if s.peers is not None:  # its modules (an HTTP server, signing, membership) load only for it
            from .peering import build

            d.peering = build(s, fetcher, d.store, d.stopping)
        d.manifests = manifests = Manifests(lambda: d.s, d.cond, lister=_listing(d, fetcher.list),
                                            spawn=d._spawn,
                                            exclusive=lambda: d.space.exclusive(),
                                            install_parts=d._install_parts)
        d._reload = Reload(flags=d._flags, config_file=d._config_file, hup=d._hup,
                           stopping=d.stopping, cond=d.cond, settings=lambda: d.s,
                           apply=d._apply_settings, revalidate=d._start_revalidate, manifests=manifests,
                           work_changed=lambda: d.schedule.work_changed(),
                           progress_line=lambda: d._progress()["line"], fit=lambda: d.space.fit_max_size())
        catalog = Catalog()
        if s.manifest_source is not None:
            d._starting.step(f"reading the manifest {s.manifest_source}")
            manifests.watch = manifests.new_watch(str(s.manifest_source), s.manifest_is_dir)
            catalog = manifests.watch.read()
    except BaseException:
        try:
            d.index = opening.result()[0]  # for teardown to close
        except BaseException:  # noqa: BLE001,S110  the error that stopped start-up is the one to report
            pass
        raise
    d._starting.step("reconciling the cache dir with its index")
    d.index, damaged = opening.result()
    wire(d, d.index, fetcher)
    if damaged:
        d.maintenance.rebuild(catalog)
    else:
        d.maintenance.reconcile(catalog)
    if manifests.watch is not None:
        manifests.install(catalog)
    d.throughput.sample()  # throughput counts from here
    # The first GETs leave now: the cache dir is taken, its index recovered and reconciled, the manifest
    # installed. What follows costs ~10-20 ms (the watch's inotify thread, the other loops) and nobody
    # sees us serving until it is done.
    for i in range(d.workers.threads):
        d._spawn(d.workers.run, f"s3cache-worker-{i}", loop="workers")
    d._spawn(d.publisher.run, "s3cache-publish")
    if manifests.watch is not None:
        # Watch before anyone can see us serving, so an edit made right after start is not missed.
        manifests.start_watch(manifests.watch)
    ops = Ops(cond=d.cond, space=d.space, schedule=d.schedule, readers=d.readers,
              maintenance=d.maintenance, watch=lambda: manifests.watch, status=d.status,
              rate=d.throughput.rate, head=fetcher.api.head, supervisor=d.supervisor)
    if d.peering is not None:  # like the readers' requests: only once the cache is reconciled
        d.peering.start(d.space, d.schedule, d.readers, d.cond, d._manifest_edited, d._spawn)
    d._spawn(d._use_loop, "s3cache-use")
    d._spawn(d._housekeeping_loop, "s3cache-housekeeping")
    d._spawn(d._reload.loop, "s3cache-reload")
    d._start_revalidate(s.revalidate)
    d._ops = ops  # requests reach the parts from now on
    log.info("serving %s: %d manifest entries, %d files ready (%s of %s)", lay.root,
             len(d.schedule.catalog), len(d.space.ready), human_size(d.space.used),
             human_size(s.max_size))


class _OnThread:
    """``fn()`` run on a thread of its own from construction; ``result`` joins it and returns its value or
    raises its exception."""

    def __init__(self, fn: Callable[[], object], name: str) -> None:
        self._fn = fn
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # noqa: BLE001  handed to whoever joins
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def wire(d: Daemon, index: Index, fetcher: Fetcher) -> None:
    """Build the parts bottom up; callables let a lower part report to one built after it."""
    s, store, cond = d.s, d.store, d.cond
    tracker = d._tracker = ReaderTracker(idle=reader_idle(s))
    d.space = Space(s, store, index, cond, tracker, drain_notes=lambda: d.readers.drain(),
                    on_evicted=lambda victims: d.schedule.evicted(victims))
    d.schedule = Schedule(s, d.space, cond, tracker, d.stopping,
                          is_waited=lambda uri: d.readers.is_waited(uri))
    d.publisher = Publisher(store, index, d.space, cond, on_published=d._published,
                            on_failed=d._fail, on_superseded=d.schedule.superseded,
                            on_disk_full=lambda entry, size: d.workers.published_on_a_full_disk(entry, size))
    d.readers = Readers(d.schedule, d.space, store, cond, tracker, notes=d._notes,
                        promote=fetcher.promote,
                        scope=Scope(s.allow, has_manifest=s.manifest_source is not None),
                        manifest_edited=d._manifest_edited)
    source = d.peering.source if d.peering is not None else fetcher
    d.workers = Workers(s, d.schedule, d.space, source, cond, is_waited=d.readers.is_waited,
                        publish=d.publisher.put, fail=d._fail, histogram=d.fetch_histogram,
                        errors=d.loop_errors)
    d.maintenance = Maintenance(store, index, d.space, d.schedule, cond, describe=fetcher.describe)


def reader_idle(s: Settings) -> float:
    """Seconds of silence after which a reader is forgotten: never while its lease could hold a file."""
    return max(s.lease, 60.0)


def _listing(d: Daemon, lister: Callable) -> Callable:
    """``lister`` (Fetcher.list) reporting each prefix line listed while starting."""
    def listed(bucket: str, prefix: str):
        got = lister(bucket, prefix)
        if d._ops is None:
            d._starting.listed(len(got))
        return got
    return listed
