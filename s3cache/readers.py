"""The readers: what readers told us (usage notes, wants) and what we owe them (answers, leases).

Owns where each reader is (the ReaderTracker: the only part that moves it), who waits on which object
(``waiters``: ctl connections), usage of files renamed into place but not yet ready, per-epoch hit and
miss counts, and how long readers waited. Handles the ``want`` request and applies ``use.sock`` notes.

Invariants it keeps:

* a reader waiting on an object gets exactly one answer per ``want``: "ready" with the path, or
  "failed" with a code, pushed on its connection (``landed``/``failed``), or its connection closes;
* a file a reader resolved has its lease start no later than the moment the reader could open it: a
  note for a ready file touches its record; a note for a file renamed but not yet ready is kept and
  applied when it becomes ready; a file a reader waits on is leased from the moment it is ready;
* every note is applied in order before the same reader's ``want`` (its position moves in order).

Lock: the daemon's state ``threading.Condition`` (see space.py for why one lock), held by the caller of
every method except ``want`` and ``closed``, which take it. Answers are written to readers' sockets
only through ``_tell`` (today under that lock; the one place to change to queue them instead).

Talks to the schedule and the space below it directly; gets readers' notes through ``notes()`` and
promotes an in-flight fetch through ``promote(uri)``, callables handed at construction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from .control import Connection
from .errors import S3CacheError
from .evict import ReaderTracker
from .index import Record
from .manifest import Entry
from .refs import parse_uri
from .schedule import Schedule
from .space import Space
from .store import Store

log = logging.getLogger("s3cache.daemon")


class Readers:
    def __init__(self, schedule: Schedule, space: Space, store: Store, cond: threading.Condition,
                 tracker: ReaderTracker, *, notes: Callable[[], Iterable[tuple[str, str, str]]],
                 promote: Callable[[str], object]) -> None:
        self._schedule = schedule
        self._space = space
        self._store = store
        self._cond = cond
        self.tracker = tracker
        self._notes = notes
        self._promote = promote
        self.waiters: dict[str, set[Connection]] = {}
        self._early_use: dict[str, float] = {}  # used by a reader between rename and "ready"
        self.epochs: dict[int, dict[str, int]] = {}  # readers' epoch -> hits and misses
        self._wanted_at: dict[str, float] = {}  # when a reader first started waiting for a file
        self.hits = 0
        self.misses = 0
        self.wait_seconds = 0.0

    def install(self) -> None:
        """A new manifest: positions in the old one mean nothing."""
        self.tracker.forget()

    def is_waited(self, uri: str) -> bool:
        return bool(self.waiters.get(uri))

    # == usage notes ==================================================================================

    def note_use(self, reader: str, uris: list[str], hit: bool) -> None:
        """A reader resolved these URIs; ``hit``: they were there when it first looked, which counts as
        a cache hit in the reader's current epoch."""
        now = time.time()
        catalog = self._schedule.catalog
        n = len(catalog)
        moved = False
        for uri in uris:
            if not self._space.touch(uri, now, reader) and self._schedule.is_fetching(uri):
                # Renamed into place but not yet marked ready: the reader already has it. Its lease
                # must start now, or the file could be evicted the moment it becomes ready.
                self._early_use[uri] = now
            pos = catalog.position(uri)
            epoch = self.tracker.epoch_of(reader)
            if pos is not None:
                epoch = self.tracker.saw(reader, pos, n, now)
                moved = True
            if hit:
                self.hits += 1
                self._epoch(epoch)["hits"] += 1
        if moved:
            self._schedule.reconsider()

    def _epoch(self, epoch: int) -> dict[str, int]:
        return self.epochs.setdefault(epoch, {"hits": 0, "misses": 0})

    def drain(self) -> None:
        """Apply every usage note readers have sent so far."""
        batch: dict[tuple[str, bool], list[str]] = {}
        for reader, kind, uri in self._notes():
            batch.setdefault((reader, kind == "h"), []).append(uri)
        for (reader, hit), uris in batch.items():
            self.note_use(reader, uris, hit=hit)

    # == wants and answers ============================================================================

    def want(self, conn: Connection, reader: str, uris: list[str], ahead: list[str] = ()) -> list[dict]:
        """A reader waits for ``uris`` (they go to the front of the queue) and will soon want ``ahead``.

        ``ahead`` is a hint for objects the manifest does not list (for listed ones the readahead policy
        already knows what comes next): they are queued behind the demand, with no one waiting yet.
        """
        log.debug("want %s (then %d more) from %s", uris, len(ahead), reader)
        results = []
        front: list[Entry] = []
        with self._cond:
            self.drain()  # the reader's earlier notes first, so its position moves in order
            self.note_use(reader, uris, hit=False)
            misses = sum(1 for u in uris if not self._space.is_ready(u))
            self.misses += misses
            self._epoch(self.tracker.epoch_of(reader))["misses"] += misses
            for raw in uris:
                try:
                    ref = parse_uri(raw)
                except S3CacheError as e:
                    results.append({"uri": raw, "state": "invalid", "message": str(e)})
                    continue
                uri = ref.uri
                path = self._space.ready_path(uri)
                if path is not None:
                    results.append({"uri": uri, "state": "ready", "path": path})
                    continue
                entry, in_flight = self._schedule.ask(ref)
                self.waiters.setdefault(uri, set()).add(conn)
                self._wanted_at.setdefault(uri, time.monotonic())
                if not in_flight:
                    front.append(entry)
                else:
                    self._promote(uri)  # it was prefetching: now a reader waits on it
                rel = self._store.plan(ref)
                results.append({"uri": uri, "state": "pending", "watch": os.path.dirname(rel)})
            self._schedule.push_front(front)
            for raw in ahead:
                try:
                    ref = parse_uri(raw)
                except S3CacheError:
                    continue
                self._schedule.hint(ref)
            self._cond.notify_all()
        return results

    def landed(self, items: list[tuple[str, Record]], now: float) -> None:
        """These files were published and are ready: start leases, answer their waiters."""
        for uri, rec in items:
            used_at = self._early_use.pop(uri, 0.0)
            if self.waiters.get(uri):
                used_at = now  # a reader is about to open it: its lease starts now
            if used_at:
                self._space.touch(uri, used_at)
            self._tell(self.waiters.pop(uri, ()), {"event": "ready", "uri": uri, "path": rec.path})
            self._stop_waiting(uri)

    def failed(self, uri: str, code: str, message: str) -> None:
        """Fetching ``uri`` failed: answer its waiters."""
        self._early_use.pop(uri, None)
        self._tell(self.waiters.pop(uri, ()), {"event": "failed", "uri": uri, "code": code, "message": message})
        self._stop_waiting(uri)

    def _tell(self, conns: Iterable[Connection], msg: dict) -> None:
        for conn in conns:
            conn.send(msg)

    def _stop_waiting(self, uri: str) -> None:
        started = self._wanted_at.pop(uri, None)
        if started is not None:
            self.wait_seconds += time.monotonic() - started

    def closed(self, conn: Connection) -> None:
        """A reader's ctl connection closed: it waits on nothing any more."""
        with self._cond:
            for uri in [u for u, cs in self.waiters.items() if conn in cs]:
                self.waiters[uri].discard(conn)
                if not self.waiters[uri]:
                    del self.waiters[uri]

    def status(self) -> dict:
        """This part's piece of ``status`` (state lock held)."""
        return {
            "readers": len(self.tracker),
            "epochs": [{"epoch": e, **v, "hit_rate": round(v["hits"] / max(1, v["hits"] + v["misses"]), 4)}
                       for e, v in sorted(self.epochs.items())],
            "hits": self.hits,
            "misses": self.misses,
            "wait_seconds": self.wait_seconds,
        }
