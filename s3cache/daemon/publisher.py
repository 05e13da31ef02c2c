"""The publisher: verified temp files become cached files, many at a time, in the crash-safe order.

Owns the publish queue and its batches (up to 512 files: one index transaction and one directory fsync
per batch, not per file). Its one thread (``run``) takes what workers ``put``, and writes a batch's
``ready`` rows in the transaction of the next batch's ``publishing`` intents (or alone once no batch has
come for ``FLUSH_AFTER``): when files arrive one at a time, as they do from a latent link, a transaction
per batch instead of two (SQLite with a FULL sync costs ~0.25 ms of CPU per transaction here, more
than the rows in it).

Invariants it keeps:

* the crash-safety order, per batch: a ``publishing`` intent is committed to the index, the files are
  renamed into place, their directories fsync'd, and only then are the rows marked ``ready`` and the
  files made ready in memory (``Space.commit``) — a SIGKILL anywhere leaves either no visible file or a
  verified one that reconcile settles at start;
* every file handed in is either published, reported failed (``on_failed``), or — when a manifest
  reload changed what its entry claims (version, stated size, checksums) while it was in flight —
  discarded and handed back to be fetched again (``on_superseded``); its temp file is never left
  behind, and a file is never both ready and failed;
* nothing after the rename fails a file: once a file is visible it is made ready in memory (tracked in
  ``used``, evictable), and a ``ready`` row not written yet (deferred to the next transaction, or one a
  full disk under the index refused) is written until it lands; meanwhile its ``publishing`` row is what
  a restart settles (reconcile: the file's size and local CRC32C, never a download);
* a deferred ``ready`` row never makes a batch fail: when the transaction carrying it with the next
  batch's intents fails, the intents are written alone before anything is renamed, as without it.

Lock: the daemon's state ``threading.Condition`` (see space.py), taken only for the in-memory commit
at the end of a batch, never across the index writes, renames or fsyncs.

Tells the parts above it what happened through callables handed at construction:
``on_published(items, now)`` (with the state lock held, right after the space committed them),
``on_failed(uri, code, message)`` and ``on_superseded(uri)`` (state lock held: the job's entry is no longer
the manifest's; fetch the object again as the manifest now describes it).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from s3cache.errors import S3CacheError
from s3cache.fetch.fetcher import Fetched
from s3cache.manifest.parse import Entry
from s3cache.store.files import Store
from s3cache.store.index import PUBLISHING, READY, Index, Record, claims_of
from s3cache.store.tree import Planned

from .space import Space

log = logging.getLogger("s3cache.daemon")

BATCH = 512
FLUSH_AFTER = 0.05  # s a deferred ``ready`` row waits for the next batch's transaction
RETRY_AFTER = 1.0  # s between attempts at rows the index refused


class Publisher:
    def __init__(self, store: Store, index: Index, space: Space, cond: threading.Condition, *,
                 on_published: Callable[[list[tuple[str, Record]], float], None],
                 on_failed: Callable[[str, str, str], None],
                 on_superseded: Callable[[str], None] = lambda uri: None,
                 on_disk_full: Callable[[Entry, int], None] | None = None) -> None:
        self._store = store
        self._index = index
        self._space = space
        self._cond = cond
        self._on_published = on_published
        self._on_failed = on_failed
        self._on_superseded = on_superseded
        self._on_disk_full = on_disk_full
        self._q: queue.Queue = queue.Queue()
        self._unwritten: dict[str, Record] = {}  # ready in memory, ``ready`` row not yet in the index
        self.fetched = 0
        self.fetched_bytes = 0
        self.superseded = 0  # jobs discarded because a reload changed their entry
        self.index_errors = 0  # failed attempts to write ``ready`` rows
        self._refused = False  # the last attempt at ``_unwritten`` failed: retry slowly

    def put(self, entry: Entry, fetched: Fetched) -> None:
        """Publish a verified, fsync'd temp file (from any thread)."""
        self._q.put((entry, fetched))

    def stop(self) -> None:
        """``run`` returns after publishing what was put before this."""
        self._q.put(None)

    def run(self) -> None:
        """The publisher thread: take a batch, publish it, until ``stop``."""
        while True:
            timeout = (RETRY_AFTER if self._refused else FLUSH_AFTER) if self._unwritten else None
            try:
                first = self._q.get(timeout=timeout)
            except queue.Empty:
                self.write_pending()
                continue
            if first is None:
                self.write_pending()
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
                self.publish(batch, defer_ready=True)
            except Exception as e:
                # Only what comes before the rename can end up here (see publish): nothing is visible.
                if self._on_disk_full is not None and filesystem_full(e):
                    # The index's commit found no room (the files took the last of it): as a download's
                    # full disk, the jobs wait for space, not fail.
                    log.error("publishing %d file(s): the filesystem is full (%s); prefetch paused until space "
                              "returns", len(batch), e)
                    for entry, f in batch:
                        self._store.discard(f.tmp_path)
                        self._on_disk_full(entry, f.size)
                else:
                    log.exception("publishing %d file(s) failed", len(batch))
                    for entry, f in batch:
                        self._fail(entry, f, e)
            if stop_after:
                self.write_pending()
                return

    def _fail(self, entry: Entry, f: Fetched, err: BaseException) -> None:
        self._store.discard(f.tmp_path)
        self._on_failed(entry.uri, "PublishFailed", f"{type(err).__name__}: {err}")

    def _stale(self, entry: Entry, f: Fetched) -> str | None:
        """Why the job ``entry``/``f`` is no longer what the manifest asks for (state lock held)."""
        catalog = self._space.catalog
        pos = catalog.position(entry.uri)
        if pos is None:
            return None  # not listed (any more): a reader asked for it, whatever it is
        rec = Record(READY, "", f.size, f.etag, f.version, f.method, f.crc32c, claims=claims_of(entry))
        return rec.stale_for(catalog.entry(pos), hinted_size=False)

    def _supersede(self, entry: Entry, why: str) -> None:
        """Drop a job a reload made stale and hand the object back to be fetched (state lock held)."""
        log.info("%s changed in the manifest while it was fetched (%s); fetching it again", entry.uri, why)
        self.superseded += 1
        self._space.release(entry.uri)
        self._on_superseded(entry.uri)

    def publish(self, batch: list[tuple[Entry, Fetched]], *, defer_ready: bool = False) -> None:
        """Publish one batch in the crash-safe order (see the module docstring). Raises only before any
        file of the batch is renamed into place. ``defer_ready``: leave the batch's ``ready`` rows to the
        next batch's intent transaction (or ``write_pending``); rows left before go into this one's."""
        now = time.time()
        if not defer_ready:
            self.write_pending()
        with self._cond:
            checked = self._space.catalog  # a Catalog never changes: a reload installs another
            current = []
            for entry, f in batch:
                why = self._stale(entry, f)
                if why is None:
                    current.append((entry, f))
                else:
                    self._store.discard(f.tmp_path)
                    self._supersede(entry, why)
            if len(current) < len(batch):
                self._cond.notify_all()
        plans: list[tuple[Entry, Fetched, Record]] = []
        planned = Planned()
        for entry, f in current:
            try:
                rel = self._store.plan(entry.ref, planned)
            except (OSError, S3CacheError) as e:
                self._fail(entry, f, e)
                continue
            planned.add(rel)
            rec = Record(PUBLISHING, rel, f.size, f.etag, f.version, f.method, f.crc32c, now, 0.0,
                         claims_of(entry))
            plans.append((entry, f, rec))
        if not plans:
            return
        # The order below is the crash-safety rule (see store.py).
        intents = [(e.uri, rec) for e, _, rec in plans]
        pending = self._pending_rows() if defer_ready else []
        if not pending or not self._write_or_log(lambda: self._index.settle_many(pending, intents),
                                                 f"writing {len(pending)} 'ready' row(s) with {len(intents)} intent(s)"):
            self._index.put_many(intents)
        else:
            self._landed(pending)
        synced = True
        try:
            errors = self._store.publish([(f.tmp_path, rec.path) for _, f, rec in plans])
        except Exception as e:
            # A directory fsync failed after the renames: whatever left the temp dir is visible now.
            log.error("publishing %d file(s): %s: %s; their rows stay 'publishing' until a restart "
                      "settles them", len(plans), type(e).__name__, e)
            synced = False
            errors = [e if os.path.exists(f.tmp_path) else None for _, f, _ in plans]
        # From here on every renamed file is visible to readers: nothing may fail it.
        failed = [(p, err) for p, err in zip(plans, errors) if err is not None]
        plans = [p for p, err in zip(plans, errors) if err is None]
        for (entry, f, _), err in failed:
            self._fail(entry, f, err)
        if failed:
            self._write_or_log(lambda: self._index.delete_many(e.uri for (e, _, _), _ in failed),
                               "dropping the rows of files that did not publish")
        ready = [(e.uri, replace(rec, state=READY)) for e, _, rec in plans]
        if synced and defer_ready:
            self._unwritten.update(ready)
        elif synced:
            self._write_ready(ready)
        with self._cond:
            # Checked again only if a reload installed another manifest since (the check parses each
            # entry's line again: a tenth of the publisher's CPU per object when it ran every time).
            late = [] if self._space.catalog is checked else \
                [(e, rec) for e, f, rec in plans if self._stale(e, f) is not None]
            late_uris = {e.uri for e, _ in late}  # once, not once per file of the batch
            fresh = [(u, rec) for u, rec in ready if u not in late_uris]
            was_full = self._space.disk_full
            for old in self._space.commit(fresh):
                self._remove(old.path)
            if was_full and not self._space.disk_full:
                # Room again, for every worker that slept on the full disk: a publish ends a landing job,
                # which frees no slot and so wakes nobody (Schedule.wake).
                self._cond.notify_all()
            for _, rec in fresh:
                self.fetched += 1
                self.fetched_bytes += rec.size
            self._on_published(fresh, now)  # each job's end wakes one idle worker (Schedule.wake)
        if log.isEnabledFor(logging.DEBUG):  # one look per batch, not one call per file
            for uri, rec in fresh:
                log.debug("ready %s (%d bytes, %s)", uri, rec.size, rec.method)
        if late:
            self._withdraw_late(late)

    def _withdraw_late(self, late: list[tuple[Entry, Record]]) -> None:
        """Files a reload made stale between the check before the rename and the commit: out of readers'
        reach (file before row, under the lease lock), then fetched again as the manifest now says."""
        with self._space.exclusive():
            for entry, rec in late:
                self._remove(rec.path)
                self._unwritten.pop(entry.uri, None)
                cur = self._space.ready.get(entry.uri)
                if cur is not None and cur.path == rec.path:
                    self._space.forget(entry.uri)  # the stale file was renamed over it
            self._write_or_log(lambda: self._index.delete_many(e.uri for e, _ in late),
                               "dropping the rows of superseded files")
            for entry, rec in late:
                why = self._stale(entry, Fetched("", rec.size, rec.etag, rec.version, rec.method, rec.crc32c))
                self._supersede(entry, why or "changed")
            self._cond.notify_all()

    def _remove(self, rel: str) -> None:
        try:
            self._store.remove(rel)
        except OSError as e:
            log.error("could not remove %s: %s", rel, e)

    def _write_ready(self, ready: list[tuple[str, Record]]) -> None:
        """Write ``ready`` rows; on failure keep them to retry (``write_pending``)."""
        if ready and not self._write_or_log(lambda: self._index.put_many(ready), f"writing {len(ready)} 'ready' row(s)"):
            for uri, rec in ready:
                self._unwritten[uri] = rec

    def _pending_rows(self) -> list[tuple[str, Record]]:
        """The ``ready`` rows still to write, as the space holds their files now. Written with
        ``Index.settle_many``, which writes one only over its own file's row: a file evicted (row
        deleted) or marked superseded between this look and the write keeps what eviction or the mark
        left."""
        if not self._unwritten:
            return []
        with self._cond:  # a file evicted or replaced meanwhile needs no row (eviction deleted it)
            # with the space's ``superseded`` mark (verify may have found it changed in S3 meanwhile)
            # and its use (a reader's, written meanwhile to the 'publishing' row by ``touch_many``)
            rows = [(u, replace(r, superseded=cur.superseded, last_used=max(r.last_used, cur.last_used)))
                    for u, r in self._unwritten.items() if _same_file(cur := self._space.ready.get(u), r)]
            for u in [u for u in self._unwritten if not _same_file(self._space.ready.get(u), self._unwritten[u])]:
                del self._unwritten[u]
        return rows

    def _landed(self, rows: list[tuple[str, Record]]) -> None:
        self._refused = False
        for uri, rec in rows:
            if _same_file(self._unwritten.get(uri), rec):
                del self._unwritten[uri]

    def write_pending(self) -> bool:
        """Write the ``ready`` rows not written yet (deferred, or refused before). True when none is left."""
        rows = self._pending_rows()
        if not rows:
            return not self._unwritten
        if not self._write_or_log(lambda: self._index.settle_many(rows), f"writing {len(rows)} 'ready' row(s)"):
            return False
        self._landed(rows)
        return True

    def _write_or_log(self, write: Callable[[], None], what: str) -> bool:
        try:
            write()
            return True
        except Exception as e:  # sqlite3 on a full or failing disk, OSError
            self._refused = True
            self.index_errors += 1
            if self.index_errors == 1 or self.index_errors % 100 == 0:
                log.error("%s to the index failed (%s: %s); the files stay published, retrying",
                          what, type(e).__name__, e)
            return False

    def status(self) -> dict:
        return {"fetched": self.fetched, "fetched_bytes": self.fetched_bytes, "superseded": self.superseded,
                "index_errors": self.index_errors, "ready_rows_pending": len(self._unwritten)}


def _same_file(cur: Record | None, rec: Record) -> bool:
    """``cur`` (the space's record) is the file ``rec`` describes: same place, same fetch, same bytes."""
    return cur is not None and (cur.path, cur.fetched_at, cur.crc32c) == (rec.path, rec.fetched_at, rec.crc32c)


def filesystem_full(err: BaseException) -> bool:
    """Whether ``err`` says the filesystem had no room: ENOSPC, or SQLite's SQLITE_FULL from the index."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, sqlite3.OperationalError) and "full" in str(err)
