"""The publisher: verified temp files become cached files, many at a time, in the crash-safe order.

Owns the publish queue and its batches (up to 512 files: one index transaction and one directory fsync
per batch, not per file). Its one thread (``run``) takes what workers ``put``.

Invariants it keeps:

* the crash-safety order, per batch: a ``publishing`` intent is committed to the index, the files are
  renamed into place, their directories fsync'd, and only then are the rows marked ``ready`` and the
  files made ready in memory (``Space.commit``) — a SIGKILL anywhere leaves either no visible file or a
  verified one that reconcile settles at start;
* every file handed in is either published or reported failed (``on_failed``), and its temp file is
  never left behind.

Lock: the daemon's state ``threading.Condition`` (see space.py), taken only for the in-memory commit
at the end of a batch, never across the index writes, renames or fsyncs.

Tells the parts above it what happened through callables handed at construction:
``on_published(items, now)`` (with the state lock held, right after the space committed them) and
``on_failed(uri, code, message)``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from .errors import S3CacheError
from .fetch import Fetched
from .index import PUBLISHING, READY, Index, Record
from .manifest import Entry
from .space import Space
from .store import Store

log = logging.getLogger("s3cache.daemon")

BATCH = 512


class Publisher:
    def __init__(self, store: Store, index: Index, space: Space, cond: threading.Condition, *,
                 on_published: Callable[[list[tuple[str, Record]], float], None],
                 on_failed: Callable[[str, str, str], None]) -> None:
        self._store = store
        self._index = index
        self._space = space
        self._cond = cond
        self._on_published = on_published
        self._on_failed = on_failed
        self._q: queue.Queue = queue.Queue()
        self.fetched = 0
        self.fetched_bytes = 0

    def put(self, entry: Entry, fetched: Fetched) -> None:
        """Publish a verified, fsync'd temp file (from any thread)."""
        self._q.put((entry, fetched))

    def stop(self) -> None:
        """``run`` returns after publishing what was put before this."""
        self._q.put(None)

    def run(self) -> None:
        """The publisher thread: take a batch, publish it, until ``stop``."""
        while True:
            first = self._q.get()
            if first is None:
                return
            batch: list[tuple[Entry, Fetched]] = [first]
            stop_after = False
            while len(batch) < BATCH:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            try:
                self.publish(batch)
            except Exception as e:
                log.exception("publishing %d file(s) failed", len(batch))
                for entry, f in batch:
                    self._store.discard(f.tmp_path)
                    self._on_failed(entry.uri, "PublishFailed", f"{type(e).__name__}: {e}")
            if stop_after:
                return

    def _fail(self, entry: Entry, f: Fetched, err: BaseException) -> None:
        self._store.discard(f.tmp_path)
        self._on_failed(entry.uri, "PublishFailed", f"{type(err).__name__}: {err}")

    def publish(self, batch: list[tuple[Entry, Fetched]]) -> None:
        """Publish one batch in the crash-safe order (see the module docstring)."""
        now = time.time()
        plans: list[tuple[Entry, Fetched, Record]] = []
        planned: set[str] = set()
        for entry, f in batch:
            try:
                rel = self._store.plan(entry.ref, planned)
            except (OSError, S3CacheError) as e:
                self._fail(entry, f, e)
                continue
            planned.add(rel)
            rec = Record(PUBLISHING, rel, f.size, f.etag, f.version, f.method, f.crc32c, now, 0.0)
            plans.append((entry, f, rec))
        # The order below is the crash-safety rule (see store.py).
        self._index.put_many((e.uri, rec) for e, _, rec in plans)
        errors = self._store.publish([(f.tmp_path, rec.path) for _, f, rec in plans])
        for (entry, f, _), err in zip(plans, errors):
            if err is not None:
                self._fail(entry, f, err)
        if any(errors):
            self._index.delete_many(e.uri for (e, _, _), err in zip(plans, errors) if err is not None)
            plans = [p for p, err in zip(plans, errors) if err is None]
        ready = [(e.uri, replace(rec, state=READY)) for e, _, rec in plans]
        self._index.put_many(ready)
        with self._cond:
            for old in self._space.commit(ready):
                self._store.remove(old.path)
            for _, rec in ready:
                self.fetched += 1
                self.fetched_bytes += rec.size
            self._on_published(ready, now)
            self._cond.notify_all()
        for uri, rec in ready:
            log.debug("ready %s (%d bytes, %s)", uri, rec.size, rec.method)

    def status(self) -> dict:
        return {"fetched": self.fetched, "fetched_bytes": self.fetched_bytes}
