"""Maintenance: make the index and the disk agree, and check that cached files are still right.

Start-up (``open_index``, then ``reconcile`` or ``rebuild``), ``s3cache verify`` (``verify``), and
``--revalidate`` (``revalidate_loop``). A file found wrong is withdrawn (``withdraw``): quarantined or
removed, its row dropped, and the object fetched again.

Invariants it keeps:

* reconcile neither re-hashes ready files nor asks S3 about them (a restart re-downloads nothing
  verified); a ``publishing`` row is settled by its file's size and local CRC32C, never trusted as is;
* rebuild indexes a file only if it passes a checksum (the manifest's, or S3's from one HEAD): size
  alone is not enough to trust a file nobody watched being written;
* a file is withdrawn only if it is still the one that was checked (same path), under the lease lock,
  file before row (``Space.withdraw``).

State: none of its own beyond its collaborators. Locks: the state lock only through the space and the
schedule (short snapshots), and the lease lock then the state lock around a withdrawal
(``Space.exclusive``); hashing and S3 requests run with no lock held.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from .catalog import Catalog
from .checksum import Expectation, digest_file, local_crc32c_of
from .errors import ChecksumMismatch, FetchFailed, S3CacheError
from .index import PUBLISHING, READY, Index, IndexCorrupt, Record
from .manifest import Entry
from .paths import HASHED_DIR, PRIVATE_DIR, readable_path
from .refs import from_identity, make_ref
from .schedule import Schedule
from .space import Space
from .store import Store

log = logging.getLogger("s3cache.daemon")


def cached_files(store: Store) -> Iterator[str]:
    """(relative path) of every file under the cache dir outside the private dir."""
    root = store.layout.root
    for top in sorted(os.listdir(root)):
        if top == PRIVATE_DIR:
            continue
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for name in files:
                yield os.path.relpath(os.path.join(dirpath, name), root)


def open_index(store: Store) -> tuple[Index, bool]:
    """The index, and whether it was lost or damaged (then the disk must be re-verified)."""
    path = store.layout.index
    try:
        index = Index(path)
    except IndexCorrupt as e:
        aside = f"{path}.damaged.{int(time.time())}"
        log.error("%s; moving it to %s and rebuilding the index from the disk", e, aside)
        os.rename(path, aside)
        return Index(path), True
    if len(index) == 0 and next(iter(cached_files(store)), None) is not None:
        log.error("the index is empty but the cache holds files; rebuilding the index from the disk")
        return index, True
    return index, False


class Maintenance:
    def __init__(self, store: Store, index: Index, space: Space, schedule: Schedule,
                 cond: threading.Condition, *, describe: Callable) -> None:
        self._store = store
        self._index = index
        self._space = space
        self._schedule = schedule
        self._cond = cond
        self._describe = describe  # Fetcher.describe: one HEAD

    # == start-up =====================================================================================

    def rebuild(self, catalog: Catalog) -> None:
        """Re-verify every file on disk and index those that pass; remove the rest.

        The expected checksum comes from the manifest where it has one, else from S3 (one HEAD: the
        object's additional checksum or its ETag). A file in the hashed namespace cannot be mapped back
        to its key, and a file S3 no longer vouches for cannot be verified: both are removed and fetched
        again if wanted. No GET is made.
        """
        rows: list[tuple[str, Record]] = []
        removed = 0
        for rel in list(cached_files(self._store)):
            bucket, _, key = rel.partition("/")
            rec = None
            if bucket != HASHED_DIR:
                try:
                    ref = make_ref(bucket, key)
                    pos = catalog.position(ref.uri)
                    entry = catalog.entry(pos) if pos is not None else Entry(ref)
                    rec = self._reverify(rel, entry) if readable_path(ref) == rel else None
                except S3CacheError as e:
                    log.info("cannot re-verify %s: %s", rel, e)
            if rec is None:
                self._store.remove(rel)
                removed += 1
            else:
                rows.append((make_ref(bucket, key).uri, rec))
        self._index.put_many(rows)
        with self._cond:
            self._space.load(rows)
        log.info("rebuilt the index from the disk: %d file(s) re-verified, %d removed", len(rows), removed)

    def _reverify(self, rel: str, entry: Entry) -> Record | None:
        path = self._store.layout.abspath(rel)
        size = os.path.getsize(path)
        expect = None
        etag = version = ""
        for method, value in (("sha256", entry.sha256), ("md5", entry.md5), ("crc32c", entry.crc32c)):
            if value:
                expect = Expectation(method, value)
                break
        if expect is None:
            described = self._describe(entry)
            expect, etag, version = described.expect, described.etag, described.version
            if described.size != size:
                return None
        if expect is None:
            return None  # size alone is not enough to trust a file nobody watched being written
        with open(path, "rb") as f:
            digest = digest_file(f, expect)
        try:
            method = digest.check(rel, entry.size if entry.size is not None else size)
        except ChecksumMismatch as e:
            log.error("re-verification failed, removing: %s", e)
            return None
        return Record(READY, rel, size, etag, version, method, digest.local_crc32c,
                      os.path.getmtime(path), 0.0)

    def reconcile(self) -> None:
        """Make the index agree with the disk without re-hashing or asking S3 about ready files.

        ``publishing`` rows (a crash between intent and ready) are settled by checking their file's size
        and local CRC32C; ``ready`` rows whose file is gone are dropped, so the object is fetched again.
        """
        promote: list[tuple[str, Record]] = []
        drop: list[str] = []
        keep: list[tuple[str, Record]] = []
        for uri, rec in self._index.items():
            path = self._store.layout.abspath(rec.path)
            if rec.state == PUBLISHING:
                try:
                    ok = os.path.getsize(path) == rec.size and local_crc32c_of(path) == rec.crc32c
                except OSError:
                    ok = False
                if ok:
                    rec = replace(rec, state=READY)
                    promote.append((uri, rec))
                else:
                    self._store.remove(rec.path)
                    drop.append(uri)
                    continue
            elif not self._store.exists(rec.path):
                drop.append(uri)
                continue
            keep.append((uri, rec))
        with self._cond:
            self._space.load(keep)
        if promote:
            self._index.put_many(promote)
        if drop:
            self._index.delete_many(drop)
        if promote or drop:
            log.info("reconciled index: %d interrupted publish(es) completed, %d missing file(s) re-queued",
                     len(promote), len(drop))

    # == checking cached files ========================================================================

    def verify(self, uris: list[str], everything: bool, source: bool) -> dict:
        """Re-hash cached files against their recorded CRC32C; with ``source``, also ask S3 (HEAD)
        whether each object changed since it was cached. A mismatch is moved to the quarantine folder
        and the object fetched again; a changed object is fetched again. Returns a report."""
        with self._cond:
            if everything:
                targets = self._space.records()
            else:
                targets = self._space.records(from_identity(x).uri for x in uris)
                missing = [x for x in uris if not self._space.is_ready(from_identity(x).uri)]
        report: dict = {"checked": 0, "ok": 0, "mismatched": [], "changed": [], "gone": [],
                        "not_cached": [] if everything else missing}
        for uri, rec in targets:
            path = self._store.layout.abspath(rec.path)
            try:
                actual = local_crc32c_of(path)
            except FileNotFoundError:
                continue  # evicted meanwhile
            report["checked"] += 1
            if actual != rec.crc32c:
                where = self.withdraw(uri, rec, quarantine=True)
                log.error("verify: %s does not match its recorded CRC32C (%s, expected %s); quarantined at %s",
                          uri, actual, rec.crc32c, where)
                report["mismatched"].append({"uri": uri, "path": rec.path, "quarantined": where})
                continue
            if source:
                with self._cond:
                    entry = self._schedule.entry_for(uri)
                entry = entry or Entry(from_identity(uri))
                try:
                    now_is = self._describe(entry)
                except FetchFailed as e:
                    report["gone"].append({"uri": uri, "code": e.code})
                    continue
                if (now_is.etag and rec.etag and now_is.etag != rec.etag) or now_is.size != rec.size:
                    self.withdraw(uri, rec, quarantine=False)
                    log.info("verify: %s changed in S3 since it was cached; fetching it again", uri)
                    report["changed"].append({"uri": uri, "etag": now_is.etag, "was": rec.etag})
                    continue
            report["ok"] += 1
        return report

    def withdraw(self, uri: str, rec: Record, quarantine: bool) -> str | None:
        """Take a file out of readers' reach and fetch the object again. Returns the quarantine path."""
        with self._space.exclusive():
            done, where = self._space.withdraw(uri, rec.path, quarantine)
            if done:
                self._schedule.refetch(from_identity(uri))
        return where

    def revalidate_loop(self, stopping: threading.Event, every: float) -> None:
        """``--revalidate``: every ``every`` seconds, ask S3 whether cached manifest objects changed."""
        while not stopping.wait(every):
            with self._cond:
                catalog = self._schedule.catalog
                uris = [u for u in self._space.ready_uris() if u in catalog]
            try:
                report = self.verify(uris, False, True)
            except Exception:
                log.exception("revalidation failed")
                continue
            if report["changed"] or report["mismatched"]:
                log.info("revalidated %d file(s): %d changed in S3, %d corrupt", report["checked"],
                         len(report["changed"]), len(report["mismatched"]))
