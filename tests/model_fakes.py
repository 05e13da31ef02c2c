"""The boundaries of the daemon, replaced for tests/model_harness.py: S3 (a versioned bucket in memory,
and the fetcher's interface over it), the parts' clock, the filesystem's free space, the sockets, and
the state condition's wait on the test thread.

Each keeps the contract of what it replaces as the daemon's parts use it: ``FakeFetcher.fetch`` raises
what ``Fetcher.fetch`` raises (the harness decides which, ``Harness.answer``), ``FakeClock`` moves only
when the test moves it, ``Filesystem.free`` is what statvfs would say of the cache dir."""

from __future__ import annotations

import hashlib
import os
import threading
import time as real_time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from s3cache.daemon import (
    announce,
    failures,
    kept_leases,
    leasing,
    publisher,
    readers,
    room,
    schedule,
    space,
    workers,
)
from s3cache.errors import FetchFailed
from s3cache.fetch.fetcher import Fetched
from s3cache.fetch.parts import Early
from s3cache.fetch.retry import Cancelled, Outage
from s3cache.fetch.s3api import Counters, Described
from s3cache.manifest.parse import Entry

if TYPE_CHECKING:
    from model_harness import Harness

BUCKET = "s3://bkt/"
# The readers, each a process (uid, pid) as the kernel names the other end of its sockets: the daemon's
# leases are per process, and the processes of one uid share a cap (two processes of uid 1000 here).
PROCESS = {"host:1": (1000, 11), "host:2": (1000, 12), "host:3": (1001, 13)}
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


CLOCKED = (space, schedule, readers, failures, publisher, room, workers, announce, kept_leases, leasing)


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

    def generation(self, entry: Entry) -> int:
        """The generation a request for ``entry`` reaches (its VersionId's, else the current one), or
        FetchFailed as S3 answers."""
        uri = entry.uri
        if entry.version:
            gen = gen_of(entry.version)
            if uri not in self.gens or gen >= len(self.gens[uri]):
                raise FetchFailed(uri, "NoSuchVersion", "the version does not exist")
            return gen
        gen = self.current(uri)
        if gen is None:
            raise FetchFailed(uri, "NoSuchKey", "the object does not exist")
        return gen

    def get(self, entry: Entry) -> tuple[int, bytes]:
        """(generation, bytes) a GET of ``entry`` returns, or FetchFailed as S3 answers."""
        self.gets += 1
        gen = self.generation(entry)
        return gen, self.body(entry.uri, gen)


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
        # The fake S3 is never unreachable: the real outage tracker, which nothing here ever trips.
        self.policy = SimpleNamespace(outage=Outage())

    def fetch(self, entry: Entry, admit: Callable[[int], bool], foreground: bool = False,
              early: Early | int | None = None) -> Fetched:
        job = self.h.jobs[entry.uri]
        job.in_fetch = True
        if isinstance(early, Early) and early.asked is not None:
            # as the real fetcher says once each GET of a first file is answered: other prefetch may go
            # while it downloads (without this the hold would last until the job ends)
            early.asked()
        job.parked.set()
        if not job.go.wait(PATIENCE):
            raise Cancelled("the test never decided this fetch")
        return self.h.answer(job, entry, admit)

    def promote(self, uri: str) -> bool:
        self.promoted.append(uri)
        return uri in self.h.jobs

    def describe(self, entry: Entry, checks: bool = True) -> Described:
        # As the real HEAD: of the manifest's VersionId when it names one (a pinned version never changes).
        gen = self.h.s3.generation(entry)
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
    """A reader's control connection: what the daemon pushed to it, and the process at its other end
    (``uid``, ``pid``: what SO_PEERCRED tells the daemon's socket server)."""

    def __init__(self, reader: str, uid: int, pid: int) -> None:
        self.reader = reader
        self.uid = uid
        self.pid = pid
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
