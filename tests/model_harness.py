"""The daemon's real parts, wired by the daemon's own composition root, with S3 replaced at the fetcher's
boundary: the harness that tests/test_model.py's state machine drives.

What is real: ``Daemon._wire`` builds space, schedule, readers, publisher, workers and maintenance over a
real cache dir, index and files; wants, notes, failures and publishes go through the daemon's own
callbacks (``_fail``, ``_published``, ``_install_parts``, ``_apply_settings``); a restart tears the
daemon down (``_teardown``) and builds a new one from the index on disk (``open_index`` then
``reconcile``), as ``Daemon._start`` does.

What is replaced, and only at a boundary:

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
import hashlib
import os
import threading
import time as real_time
from collections.abc import Callable
from pathlib import Path

from s3cache.daemon import (
    announce,
    failures,
    publisher,
    readers,
    room,
    schedule,
    space,
    workers,
)
from s3cache.daemon.maintenance import open_index
from s3cache.daemon.reload import Manifests
from s3cache.daemon.root import Daemon
from s3cache.errors import FetchFailed, ObjectChanged, WrongChecksum
from s3cache.fetch.checksum import local_crc32c_of
from s3cache.fetch.fetcher import Fetched, NeedSpace
from s3cache.fetch.retry import Cancelled
from s3cache.fetch.s3api import Counters, Described
from s3cache.fetch.stream import DiskFull
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.service.config import Settings

BUCKET = "s3://bkt/"
PATIENCE = 60.0  # seconds a test thread waits for a worker thread to park or finish (load, not logic)


# == the clock =======================================================================================

class FakeClock:
    """``time.time`` and ``time.monotonic`` for the parts; everything else is the real ``time``."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def __getattr__(self, name):
        return getattr(real_time, name)


CLOCKED = (space, schedule, readers, failures, publisher, room, workers, announce)


class clocked:
    """Give the daemon's parts ``clock`` as their ``time`` module while the block runs."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def __enter__(self) -> FakeClock:
        for m in CLOCKED:
            m.time = self.clock
        return self.clock

    def __exit__(self, *exc) -> None:
        for m in CLOCKED:
            m.time = real_time


# == S3 ==============================================================================================

def content(uri: str, gen: int, size: int) -> bytes:
    """The bytes of generation ``gen`` of ``uri`` (each generation's differ)."""
    seed = hashlib.sha256(f"{uri}#{gen}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def version_of(gen: int) -> str:
    return f"v{gen}"


def gen_of(version: str) -> int:
    return int(version[1:])


class FakeS3:
    """A versioned bucket in memory: uri -> sizes of its generations (the last is the current one);
    a deleted object has no current generation."""

    def __init__(self) -> None:
        self.gens: dict[str, list[int]] = {}
        self.deleted: set[str] = set()
        self.gets = 0

    def put(self, uri: str, size: int) -> int:
        self.gens.setdefault(uri, []).append(size)
        self.deleted.discard(uri)
        return len(self.gens[uri]) - 1

    def delete(self, uri: str) -> None:
        if uri in self.gens:
            self.deleted.add(uri)

    def current(self, uri: str) -> int | None:
        if uri not in self.gens or uri in self.deleted:
            return None
        return len(self.gens[uri]) - 1

    def body(self, uri: str, gen: int) -> bytes:
        return content(uri, gen, self.gens[uri][gen])

    def sha256(self, uri: str, gen: int) -> str:
        return hashlib.sha256(self.body(uri, gen)).hexdigest()

    def get(self, entry: Entry) -> tuple[int, bytes]:
        """(generation, bytes) a GET of ``entry`` returns, or FetchFailed as S3 answers."""
        self.gets += 1
        uri = entry.uri
        if entry.version:
            gen = gen_of(entry.version)
            if uri not in self.gens or gen >= len(self.gens[uri]):
                raise FetchFailed(uri, "NoSuchVersion", "the version does not exist")
        else:
            gen = self.current(uri)
            if gen is None:
                raise FetchFailed(uri, "NoSuchKey", "the object does not exist")
        return gen, self.body(uri, gen)


class Job:
    """One fetch handed out by ``Schedule.next_job`` and run by ``Workers._one`` in a thread."""

    def __init__(self, entry: Entry, demand: bool) -> None:
        self.entry = entry
        self.demand = demand
        self.outcome: str | None = None
        self.go = threading.Event()
        self.parked = threading.Event()  # blocked in FakeFetcher.fetch, waiting for ``go``
        self.done = threading.Event()
        self.in_fetch = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


class FakeFetcher:
    """``Fetcher``'s interface to the daemon (fetch, promote, describe, abort, close, counters), over
    ``FakeS3``. ``fetch`` parks until the test gives its job an outcome."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.counters = Counters()
        self.promoted: list[str] = []

    def fetch(self, entry: Entry, admit: Callable[[int], bool], foreground: bool = False) -> Fetched:
        job = self.h.jobs[entry.uri]
        job.in_fetch = True
        job.parked.set()
        if not job.go.wait(PATIENCE):
            raise Cancelled("the test never decided this fetch")
        return self.h.answer(job, entry, admit)

    def promote(self, uri: str) -> bool:
        self.promoted.append(uri)
        return uri in self.h.jobs

    def describe(self, entry: Entry) -> Described:
        gen = self.h.s3.current(entry.uri)
        if gen is None:
            raise FetchFailed(entry.uri, "NoSuchKey", "the object does not exist")
        body = self.h.s3.body(entry.uri, gen)
        return Described(len(body), hashlib.md5(body).hexdigest(), version_of(gen), None)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Use:
    """The usage socket: notes readers sent, drained by the daemon (``Server.use.drain``)."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, str, str]] = []

    def drain(self):
        out, self.notes = self.notes, []
        return out


class FakeServer:
    """What the daemon reads of its socket server: the usage notes, and counters for status."""

    def __init__(self) -> None:
        self.use = _Use()

    def counters(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


class Conn:
    """A reader's control connection: what the daemon pushed to it."""

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self.sent: list[dict] = []

    def send(self, msg: dict) -> bool:
        self.sent.append(msg)
        return True


class WouldBlock(Exception):
    """``Schedule.next_job`` found no job and would wait (the test thread never waits there)."""


class StateCondition(threading.Condition):
    """The daemon's state condition, except that the test thread's wait raises WouldBlock: ``next_job``
    waits only when it has nothing to hand out, and then the test wants to know, not to sleep."""

    def __init__(self, lock) -> None:
        super().__init__(lock)
        self.main = threading.get_ident()

    def wait(self, timeout=None):
        if threading.get_ident() == self.main:
            raise WouldBlock()
        return super().wait(timeout)


# == the filesystem ====================================================================================

class Filesystem:
    """The cache dir's filesystem as statvfs would report it: ``capacity`` bytes, less the files under
    the cache dir (measured), less ``other`` bytes taken by someone else (the test fills the disk)."""

    CAPACITY = 64 << 20

    def __init__(self, root: Path) -> None:
        self.root = root
        self.other = 0

    def on_disk(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
        return total

    def free(self) -> int:
        return max(0, self.CAPACITY - self.other - self.on_disk())

    def fill(self, leave: int) -> None:
        self.other = max(0, self.CAPACITY - self.on_disk() - leave)


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
        self.evictions: list[tuple[list, set[str], set[str]]] = []  # (victims, held, pinned) as seen then
        self.errors: list[str] = []
        self.d: Daemon | None = None
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
        evicted = d.space._on_evicted

        def on_evicted(victims):  # what eviction saw as held and pinned when it chose these
            held = d.space.leases.held(self.clock.mono)
            self.evictions.append((list(victims), held, {v.uri for v in victims if d.space.is_pinned(v.uri)}))
            self.evicted_here += len(victims)
            evicted(victims)

        d.space._on_evicted = on_evicted
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
        parts, install the manifest again (``Manifests.replace`` of the same text), wake the workers."""
        d = self.d
        merged = dataclasses.replace(d.s, **changes)
        with d.cond:
            d._apply_settings(merged)
        d.manifests.install(self.reread())
        with d.cond:
            d.schedule.work_changed()

    def close(self) -> None:
        for job in list(self.jobs.values()):
            self.finish(job, "cancel")
        if self.d is not None:
            self.publish()
            self.d._teardown()
            self.d = None
