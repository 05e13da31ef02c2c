"""The daemon's real parts, wired by the daemon's own composition root, with S3 replaced at the fetcher's
boundary: the harness that tests/test_model.py's state machine drives.

What is real: ``Daemon._wire`` builds space, schedule, readers, publisher, workers and maintenance over a
real cache dir, index and files; wants, notes, failures and publishes go through the daemon's own
callbacks (``_fail``, ``_published``, ``_install_parts``, ``_apply_settings``); a restart tears the
daemon down (``_teardown``) and builds a new one from the index on disk (``open_index`` then
``reconcile``), as ``Daemon._start`` does.

What is replaced, and only at a boundary (tests/model_fakes.py):

* S3: ``FakeS3`` holds versioned objects in memory; ``FakeFetcher`` answers ``Workers``' call to
  ``Fetcher.fetch`` the way the real one does (SizeMismatch, WrongChecksum, NoSuchKey, NeedSpace through
  ``admit``, DiskFull, ObjectChanged, Cancelled) and writes a real temp file through the store;
* the clock: the parts' ``time`` module is a ``FakeClock`` (wall and monotonic clocks that move only when
  the test moves them, independently, so a wall-clock step can be taken);
* the filesystem's free space (``Store.free_bytes``, a statvfs): a capacity the test can fill;
* the sockets: a reader's connection records what the daemon pushes to it; the usage socket is a list.

Each fetch runs in a worker thread of its own (``Workers._one``, as a worker thread runs it) that
blocks inside ``FakeFetcher.fetch`` until the test decides the outcome; the test thread always waits
until that thread is parked again or done, so only one thread changes state at a time and a run is
reproducible."""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from model_fakes import (
    PATIENCE,
    FakeClock,
    FakeFetcher,
    FakeS3,
    FakeServer,
    Filesystem,
    Job,
    StateCondition,
    WouldBlock,
    version_of,
)

from s3cache.daemon.maintenance import open_index
from s3cache.daemon.ops import Ops
from s3cache.daemon.reload import Manifests
from s3cache.daemon.root import Daemon
from s3cache.errors import FetchFailed, ObjectChanged, WrongChecksum
from s3cache.fetch.checksum import local_crc32c_of
from s3cache.fetch.fetcher import Fetched, NeedSpace
from s3cache.fetch.retry import Cancelled
from s3cache.fetch.stream import DiskFull
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.service.config import Settings

# == the daemon, built and rebuilt ====================================================================

class Harness:
    """One daemon's parts over ``root``, rebuilt by ``restart``; the fakes outlive restarts."""

    def __init__(self, root: Path, settings: Settings, clock: FakeClock) -> None:
        self.root = root
        self.clock = clock
        self.s3 = FakeS3()
        self.fs = Filesystem(root)
        self.catalog = Catalog()
        self.entries: list[Entry] = []  # the manifest's lines, as the catalog was built from them
        self.jobs: dict[str, Job] = {}
        # (victims, held, pinned, what the model's leases protect) as they were when eviction chose them
        self.evictions: list[tuple[list, set[str], set[str], set[str]]] = []
        self.errors: list[str] = []
        self.d: Daemon | None = None
        self.on_flush: Callable[[], None] = lambda: None  # after each Space.flush (the model's snapshot)
        self.protected: Callable[[], set[str]] = set  # files the model says leases hold (at each eviction)
        self._build(settings)

    # -- building ------------------------------------------------------------------------------------

    def _build(self, settings: Settings) -> None:
        """What ``Daemon._start`` does, with the fakes: open the store, clean temp files, open the index,
        wire the parts, reconcile (or rebuild), install the manifest."""
        d = Daemon(settings)
        d.cond = StateCondition(d.lock)
        d.store.free_bytes = self.fs.free  # statvfs of the cache filesystem
        d.store.open()
        d.store.clean_tmp()
        d.fetcher = self.fetcher = FakeFetcher(self)
        d.server = self.server = FakeServer()
        d.index, damaged = open_index(d.store)
        self.evicted_here = 0  # files this daemon evicted (its status counts since its start)
        d._wire(d.index, d.fetcher)
        # The reader tracker measures silence on its own clock (a duration): the test's monotonic one.
        d._tracker.clock = self.clock.monotonic
        evicted = d.space._on_evicted

        def on_evicted(victims):  # what eviction saw as held and pinned when it chose these
            held = d.space.leases.held(self.clock.mono)
            self.evictions.append((list(victims), held, {v.uri for v in victims if d.space.is_pinned(v.uri)},
                                   self.protected()))
            self.evicted_here += len(victims)
            evicted(victims)

        d.space._on_evicted = on_evicted
        flush = d.space.flush

        def flushed():  # usage and leases written to the index: what a crash keeps of them
            flush()
            self.on_flush()

        d.space.flush = flushed
        put = d.publisher.put

        def publish(entry, fetched):  # what workers handed the publisher and it has not published yet
            self.queued.append(entry.uri)
            put(entry, fetched)

        d.workers._publish = publish
        self.queued: list[str] = []
        self.reread()
        if damaged:
            d.maintenance.rebuild(self.catalog)
        else:
            d.maintenance.reconcile(self.catalog)
        d.manifests = Manifests(lambda: d.s, d.cond, lister=lambda *a: [], spawn=lambda *a, **k: None,
                                exclusive=lambda: d.space.exclusive(), install_parts=d._install_parts)
        d.manifests.install(self.catalog)
        # Serving from here, as Daemon._start ends: requests (and status) reach the parts, not 'starting'.
        d._ops = Ops(cond=d.cond, space=d.space, schedule=d.schedule, readers=d.readers,
                     maintenance=d.maintenance, watch=lambda: d.manifests.watch, status=d.status,
                     rate=d.throughput.rate)
        self.d = d

    def restart(self, crash: bool) -> None:
        """Stop the daemon (fetches cancelled; queued publishes done unless ``crash``) and start a new
        one on the same cache dir, as ``systemctl restart`` or a crash and systemd's restart do."""
        d = self.d
        for job in list(self.jobs.values()):
            self.finish(job, "cancel")
        if crash:  # nothing more is written: the new daemon finds what the disk holds
            d.stopping.set()
            d.index.close()
            d.space.close()
            d.store.close()
        else:
            self.publish()
            d._teardown()
        self._build(d.s)

    # -- S3's answers -------------------------------------------------------------------------------

    def answer(self, job: Job, entry: Entry, admit: Callable[[int], bool]) -> Fetched:
        """What ``Fetcher.fetch`` returns or raises for ``job``'s outcome (in the worker thread)."""
        uri = entry.uri
        if job.outcome == "cancel":
            raise Cancelled("stopping")
        if job.outcome == "transient":
            raise FetchFailed(uri, "SlowDown", "503 after every attempt")
        if job.outcome == "changed_for_good":
            self.s3.put(uri, len(self.s3.body(uri, self.s3.current(uri))) if self.s3.current(uri) is not None
                        else 100)
            raise ObjectChanged(f"{uri}: changed in S3 during the download, 3 times")
        if job.outcome == "changed":  # the fetcher starts over and gets the new object
            cur = self.s3.current(uri)
            if cur is not None:
                self.s3.put(uri, self.s3.gens[uri][cur] + 7)
        gen, body = self.s3.get(entry)
        total = len(body)
        if entry.size is not None and total != entry.size and not entry.size_is_hint:
            raise FetchFailed(uri, "SizeMismatch", f"S3 says {total} bytes, the manifest says {entry.size}")
        if not admit(total):
            raise NeedSpace(total)
        if entry.sha256 and entry.sha256 != hashlib.sha256(body).hexdigest():
            raise WrongChecksum(uri, "the manifest's sha256 disagrees with S3's own checksum of the bytes")
        if job.outcome == "disk_full":
            self.fs.fill(leave=total // 2)
        if total > self.fs.free():
            raise DiskFull(f"no space left for {uri} ({total} bytes)", total)
        fd, tmp = self.d.store.new_temp(uri.rsplit("/", 1)[-1])
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        method = "sha256" if entry.sha256 else "md5"
        return Fetched(tmp, total, hashlib.md5(body).hexdigest(), version_of(gen), method, local_crc32c_of(tmp))

    # -- jobs ----------------------------------------------------------------------------------------

    def take(self) -> tuple[Entry, bool] | None:
        """The job ``next_job`` hands out now, or None where a worker would wait."""
        try:
            return self.d.schedule.next_job()
        except WouldBlock:
            return None

    def start(self, entry: Entry, demand: bool) -> Job:
        """Run ``Workers._one`` for the job in a worker thread until it parks in the fetch or ends."""
        job = self.jobs[entry.uri] = Job(entry, demand)
        d = self.d

        def run() -> None:
            try:
                d.workers._one(entry, demand)
            except Exception as e:  # noqa: BLE001 - as Workers.run: an outcome that could not be routed
                job.error = e
                self.errors.append(f"{type(e).__name__}: {e}")
                d.workers._give_up(entry, e)
            finally:
                job.done.set()
                job.parked.set()

        job.thread = threading.Thread(target=run, name=f"model-worker-{entry.uri}", daemon=True)
        job.thread.start()
        self._wait(job.parked, f"the fetch of {entry.uri} to start")
        if job.done.is_set():
            self._end(job)
        return job

    def finish(self, job: Job, outcome: str) -> None:
        job.outcome = outcome
        job.go.set()
        self._wait(job.done, f"the fetch of {job.entry.uri} to end ({outcome})")
        self._end(job)

    def _end(self, job: Job) -> None:
        job.thread.join(PATIENCE)
        if self.jobs.get(job.entry.uri) is job:
            del self.jobs[job.entry.uri]

    @staticmethod
    def _wait(event: threading.Event, what: str) -> None:
        if not event.wait(PATIENCE):
            faulthandler.dump_traceback(sys.stderr)  # where every thread is: a hang is a bug to find
            raise AssertionError(f"waited {PATIENCE:.0f} s for {what}")

    def publish(self) -> None:
        """The publisher thread's work so far: publish everything workers handed it, then return."""
        self.d.publisher.stop()
        self.d.publisher.run()
        self.queued.clear()

    # -- the daemon's loops, one turn ----------------------------------------------------------------

    def housekeeping(self) -> None:
        """One turn of ``Daemon._housekeeping_loop``'s work on the parts."""
        d = self.d
        d.space.flush()
        d.schedule.retry_due()
        d.readers.expire_parked()
        d.schedule.reconsider()
        if d.space.space_returned():
            with d.cond:
                d.schedule.work_changed()

    def drain_notes(self) -> None:
        """One turn of ``Daemon._use_loop``."""
        with self.d.cond:
            self.d.readers.drain()

    def install(self, entries: list[Entry]) -> None:
        """A manifest edit: its entries read and installed (``ManifestWatch`` then ``Manifests.install``)."""
        self.entries = list(entries)
        self.catalog = Catalog.build(self.entries)
        self.d.manifests.install(self.catalog)

    def reread(self) -> Catalog:
        """The manifest read again (at start, or by SIGHUP): its prefix lines listed again, so a listed
        size is S3's size now and an object deleted since is gone from the listing."""
        entries = []
        for e in self.entries:
            if e.size_is_hint:
                gen = self.s3.current(e.uri)
                if gen is None:
                    continue
                e = e._replace(size=self.s3.gens[e.uri][gen])
            entries.append(e)
        self.catalog = Catalog.build(entries)
        return self.catalog

    def sighup(self, **changes) -> None:
        """What ``Reload.reload`` does when only live settings changed: apply them to the daemon and its
        parts, install the manifest again (``Manifests.replace`` of the same text), evict down to a smaller
        --max-size (``Space.fit_max_size``), wake the workers."""
        d = self.d
        merged = dataclasses.replace(d.s, **changes)
        with d.cond:
            d._apply_settings(merged)
        d.manifests.install(self.reread())
        d.space.fit_max_size()  # after the manifest, which may pin or unpin files; a no-op within the bound
        with d.cond:
            d.schedule.work_changed()

    def close(self) -> None:
        for job in list(self.jobs.values()):
            self.finish(job, "cancel")
        if self.d is not None:
            self.publish()
            self.d._teardown()
            self.d = None
