"""The daemon's parts on a real cache dir, for their unit tests: a real Store, Index, Catalog and
ReaderTracker, wired as daemon.py wires them, without threads, sockets or S3."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from s3cache.daemon.readers import Readers
from s3cache.daemon.schedule import Schedule
from s3cache.daemon.space import Space
from s3cache.fetch.checksum import local_crc32c_of
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import parse_uri
from s3cache.manifest.scope import Scope
from s3cache.policy.tracker import ReaderTracker
from s3cache.service.config import Settings
from s3cache.store.files import Store
from s3cache.store.index import READY, Index, Record


def entry(uri: str, size: int | None = None, **kw) -> Entry:
    return Entry(parse_uri(uri), size, **kw)


def catalog(*entries: Entry) -> Catalog:
    return Catalog.build(entries)


class Rig:
    """Space, schedule and readers over one cache dir, sharing one state lock as in the daemon."""

    def __init__(self, root: Path, **settings) -> None:
        self.s = Settings(cache_dir=root, **{"min_free": 0.0, **settings})
        self.store = Store(str(root))
        self.store.open()
        self.index = Index(self.store.layout.index)
        self.cond = threading.Condition(threading.RLock())
        self.stopping = threading.Event()
        self.tracker = ReaderTracker(idle=max(self.s.lease, 60.0))
        self.notes: list[tuple[str, str, str]] = []  # (reader, kind, uri) waiting to be drained
        self.evicted_positions: list[list[int | None]] = []
        self.promoted: list[str] = []
        self.space = Space(self.s, self.store, self.index, self.cond, self.tracker,
                           drain_notes=lambda: self.readers.drain(), on_evicted=self._evicted)
        self.schedule = Schedule(self.s, self.space, self.cond, self.tracker, self.stopping,
                                 is_waited=lambda uri: self.readers.is_waited(uri))
        # No fetcher says when a first file's bytes are all asked for (``Schedule.asked``), which holds
        # other prefetch back: these parts hand out in plain order (test_schedule.py tests the hold).
        self.schedule.first_files = 0
        # Every object in scope: these tests ask for objects outside their manifests (test_scope.py is the
        # scope's own test).
        self.readers = Readers(self.schedule, self.space, self.store, self.cond, self.tracker,
                               notes=self._drain, promote=self.promoted.append, scope=Scope(["s3://"]))

    def _evicted(self, victims) -> None:
        self.evicted_positions.append([v.position for v in victims])
        self.schedule.evicted(victims)

    def _drain(self):
        out, self.notes[:] = list(self.notes), []
        return out

    def install(self, cat: Catalog) -> list[Record]:
        with self.space.exclusive():
            stale = self.space.install(cat)
            self.readers.install(cat.jobs)
            self.schedule.install(cat)
        return stale

    def temp_file(self, data: bytes) -> str:
        fd, path = self.store.new_temp("t")
        os.write(fd, data)
        os.close(fd)
        return path

    def cached(self, uri: str, data: bytes, *, last_used: float = 0.0) -> Record:
        """A ready file on disk, in the index and in the space (as reconcile leaves it)."""
        rel = self.store.prepare(parse_uri(uri))
        assert self.store.publish([(self.temp_file(data), rel)]) == [None]
        path = self.store.layout.abspath(rel)
        rec = Record(READY, rel, len(data), "", "", "size", local_crc32c_of(path), time.time(), last_used)
        self.index.put_many([(uri, rec)])
        with self.cond:
            self.space.load([(uri, rec)])
        return rec

    def close(self) -> None:
        self.stopping.set()
        self.space.close()
        self.index.close()
        self.store.close()


@contextlib.contextmanager
def control_connection(where: Path):
    """A real control connection: the daemon's side (a Connection of a real Server on sockets in
    ``where``) and the client's reply stream, as a reader sees it."""
    import json
    import socket

    from s3cache.sockets.control import Server

    seen: list = []
    server = Server(str(where / "ctl.sock"), str(where / "use.sock"),
                    lambda c, msg: seen.append(c) or {"ok": True}, lambda c: None)
    server.start()
    theirs = socket.socket(socket.AF_UNIX)
    theirs.settimeout(10)
    try:
        theirs.connect(str(where / "ctl.sock"))
        theirs.sendall(b'{"op":"hello"}\n')
        replies = theirs.makefile("r")
        assert json.loads(replies.readline()) == {"ok": True}
        yield seen[0], replies
    finally:
        theirs.close()
        server.stop()
