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
from .index import PUBLISHING, READY, Index, IndexCorrupt, Record, claims_of
from .manifest import Entry
from .paths import HASHED_DIR, PRIVATE_DIR, readable_path
from .refs import from_identity, make_ref
from .retry import Cancelled
from .schedule import Schedule
from .space import Space
from .store import Store

log = logging.getLogger("s3cache.daemon")

HELD = "unverified"  # index meta row: files kept aside while S3 could not vouch for them
# S3's answers that settle that a cached file is not (any more) the object: anything else (unreachable,
# throttled, 5xx, access denied, no credentials) says nothing about the file.
DEFINITIVE = frozenset({"NoSuchKey", "NoSuchVersion", "NoSuchBucket"})


class _Unreachable(Exception):
    """S3 had to vouch for a file and gave no definitive answer."""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        self.held: dict[str, tuple[str, str]] = {}  # uri -> (its path, where it waits unverified)

    # == start-up =====================================================================================

    def rebuild(self, catalog: Catalog) -> None:
        """Re-verify every file on disk and index those that pass; remove those that definitively fail.

        The expected checksum comes from the manifest where it has one, else from S3 (one HEAD: the
        object's additional checksum or its ETag). A file in the hashed namespace cannot be mapped back
        to its key: it is removed. A file S3 definitively disowns (no such key, version or bucket, or
        another size or checksum) is removed. A file S3 could not be asked about (unreachable, throttled,
        no credentials) is kept aside, unverified, in the quarantine dir, out of readers' reach: it is
        re-checked at the next start (``recheck_held``); after the first such error the rebuild stops
        asking S3, so an unreachable endpoint does not hold start-up for a backoff per file. No GET is
        made.
        """
        self.recheck_held(catalog)
        rows: list[tuple[str, Record]] = []
        removed = 0
        unreachable: str | None = None
        for rel in list(cached_files(self._store)):
            bucket, _, key = rel.partition("/")
            rec = None
            aside = False
            if bucket != HASHED_DIR:
                try:
                    ref = make_ref(bucket, key)
                    pos = catalog.position(ref.uri)
                    entry = catalog.entry(pos) if pos is not None else Entry(ref)
                    if readable_path(ref) == rel:
                        rec = self._reverify(self._store.layout.abspath(rel), rel, entry, unreachable is None)
                except _Unreachable as e:
                    unreachable = unreachable or str(e)
                    aside = True
                except S3CacheError as e:
                    log.info("cannot re-verify %s: %s", rel, e)
            if rec is not None:
                rows.append((make_ref(bucket, key).uri, rec))
            elif aside:
                self._hold(make_ref(bucket, key).uri, rel)
            else:
                self._store.remove(rel)
                removed += 1
        self._index.put_many(rows)
        self._save_held()
        with self._cond:
            self._space.load(rows)
        log.info("rebuilt the index from the disk: %d file(s) re-verified, %d removed, %d kept aside unverified",
                 len(rows), removed, len(self.held))
        if unreachable:
            log.warning("S3 could not be reached while rebuilding the index (%s): %d file(s) that only S3 can "
                        "vouch for are kept aside, unverified, in %s and never served; the next start "
                        "re-checks them (one HEAD each, no download)", unreachable, len(self.held),
                        self._store.layout.quarantine)

    def _reverify(self, path: str, rel: str, entry: Entry, ask_s3: bool) -> Record | None:
        """A READY record for the file at ``path`` (to be published at ``rel``) if it passes its check;
        None if it definitively fails. Raises _Unreachable when S3 must vouch for it and cannot answer
        (or ``ask_s3`` is False)."""
        size = os.path.getsize(path)
        claims = [Expectation(m, v) for m, v in (("sha256", entry.sha256), ("md5", entry.md5),
                                                  ("crc32c", entry.crc32c)) if v]
        etag = version = ""
        if claims:
            expect, also = claims[0], tuple(claims[1:])
        else:
            if not ask_s3:
                raise _Unreachable("not asked: S3 was unreachable earlier in this rebuild")
            try:
                described = self._describe(entry)
            except Cancelled:
                raise _Unreachable("the daemon is stopping") from None
            except FetchFailed as e:
                if e.code in DEFINITIVE:
                    log.info("re-verification: %s is gone from S3 (%s), removing", entry.uri, e.code)
                    return None
                raise _Unreachable(f"{e.code}: {e.reason}"[:300]) from e
            expect, also, etag, version = described.expect, (), described.etag, described.version
            if described.size != size:
                log.info("re-verification: %s is %d bytes in S3, %d on disk; removing", entry.uri,
                         described.size, size)
                return None
        if expect is None:
            return None  # size alone is not enough to trust a file nobody watched being written
        with open(path, "rb") as f:
            digest = digest_file(f, expect, also)
        try:
            method = digest.check(rel, entry.size if entry.size is not None and not entry.size_is_hint else size)
        except ChecksumMismatch as e:
            log.error("re-verification failed, removing: %s", e)
            return None
        return Record(READY, rel, size, etag, version, method, digest.local_crc32c,
                      os.path.getmtime(path), 0.0, claims_of(entry))

    # -- files kept aside while S3 could not vouch for them -----------------------------------------

    def _hold(self, uri: str, rel: str) -> None:
        """Move an unverifiable file out of readers' reach, remembering where (saved by _save_held)."""
        try:
            where = self._store.quarantine(rel)
        except OSError as e:
            log.error("cannot set %s aside (%s); removing it rather than serving it unverified", rel, e)
            self._store.remove(rel)
            return
        self.held[uri] = (rel, where)

    def _save_held(self) -> None:
        self._index.set_meta(HELD, {u: list(v) for u, v in self.held.items()})

    def recheck_held(self, catalog: Catalog) -> None:
        """Re-check files a rebuild kept aside because S3 was unreachable: those that pass are published
        where they belong (intent, rename, ready, as any publish) without a download; those S3 disowns
        are deleted; the rest stay aside (S3 still unreachable). Start-up only."""
        held = {u: tuple(v) for u, v in (self._index.get_meta(HELD, {}) or {}).items()}
        if not held and not self.held:
            return
        self.held = {}
        back: list[tuple[str, Record]] = []
        unreachable = None
        for uri, (rel, where) in held.items():
            if self._index.get(uri) is not None or not os.path.exists(where):
                _unlink(where)  # fetched again meanwhile (or gone): the held copy is not needed
                continue
            ref = from_identity(uri)
            pos = catalog.position(uri)
            entry = catalog.entry(pos) if pos is not None else Entry(ref)
            try:
                rec = self._reverify(where, rel, entry, unreachable is None)
            except _Unreachable as e:
                unreachable = unreachable or str(e)
                self.held[uri] = (rel, where)
                continue
            except (S3CacheError, OSError) as e:
                log.info("cannot re-check %s: %s", uri, e)
                rec = None
            if rec is None:
                _unlink(where)
                continue
            try:
                rel = self._store.plan(ref)
                tmp = self._store.take_back(where)
            except (OSError, S3CacheError) as e:
                log.error("cannot put %s back in place: %s", uri, e)
                _unlink(where)
                continue
            rec = replace(rec, path=rel, state=PUBLISHING)
            self._index.put_many([(uri, rec)])
            [err] = self._store.publish([(tmp, rel)])
            if err is not None:
                log.error("cannot put %s back in place: %s", uri, err)
                self._store.discard(tmp)
                self._index.delete_many([uri])
                continue
            back.append((uri, replace(rec, state=READY)))
        self._index.put_many(back)
        self._save_held()
        with self._cond:
            self._space.load(back)
        log.info("re-checked %d file(s) kept aside unverified: %d verified and back in place, %d still "
                 "unverified%s", len(held), len(back), len(self.held),
                 f" (S3: {unreachable})" if unreachable else "")

    def status(self) -> dict:
        """This part's piece of ``status``."""
        return {"unverified": len(self.held)}

    def reconcile(self, catalog: Catalog | None = None) -> None:
        """Make the index agree with the disk without re-hashing or asking S3 about ready files.

        ``publishing`` rows (a crash between intent and ready) are settled by checking their file's size
        and local CRC32C; ``ready`` rows whose file is gone are dropped, so the object is fetched again.
        Files an earlier rebuild kept aside unverified are re-checked first (``recheck_held``).
        """
        self.recheck_held(catalog if catalog is not None else Catalog())
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
        (removed if it cannot be) and the object fetched again; a file that could be neither stays and
        is reported with the error. A changed object is fetched again while its cached file stays
        readable until the new one is verified and replaces it: only a definitive answer (another
        ETag or size) counts, and a good copy is never deleted first. Returns a report."""
        with self._cond:
            if everything:
                targets = self._space.records()
            else:
                targets = self._space.records(from_identity(x).uri for x in uris)
                missing = [x for x in uris if not self._space.is_ready(from_identity(x).uri)]
        report: dict = {"checked": 0, "ok": 0, "mismatched": [], "changed": [], "gone": [],
                        "not_cached": [] if everything else missing}
        for uri, rec in targets:
            for _ in range(3):  # a new copy renamed over the file while it was hashed: check that one
                path = self._store.layout.abspath(rec.path)
                try:
                    with open(path, "rb") as f:
                        ino = os.fstat(f.fileno()).st_ino
                        actual = digest_file(f, None).local_crc32c
                except FileNotFoundError:
                    rec = None  # evicted meanwhile
                    break
                if actual == rec.crc32c:
                    break
                done, where, error = self.withdraw(uri, rec, quarantine=True, hashed=ino)
                if done or error is not None:
                    break
                with self._cond:  # replaced meanwhile: wait for the new copy's record, then hash it
                    self._cond.wait_for(lambda: not self._schedule.is_fetching(uri), timeout=60)
                    rec = self._space.ready.get(uri)
                if rec is None:
                    break
            else:
                continue  # kept changing under us: nothing to say about it
            if rec is None:
                continue
            report["checked"] += 1
            if actual != rec.crc32c:
                if not done and error is None:
                    continue
                log.error("verify: %s does not match its recorded CRC32C (%s, expected %s); %s", uri, actual,
                          rec.crc32c, f"quarantined at {where}" if where else error or "removed")
                item = {"uri": uri, "path": rec.path, "quarantined": where}
                if error:
                    item["error"] = error
                report["mismatched"].append(item)
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
                    with self._cond:
                        if self._space.ready.get(uri) is not None:
                            self._schedule.replace(uri)
                    log.info("verify: %s changed in S3 since it was cached; fetching it again (the cached "
                             "file stays until the new one is verified)", uri)
                    report["changed"].append({"uri": uri, "etag": now_is.etag, "was": rec.etag})
                    continue
            report["ok"] += 1
        return report

    def withdraw(self, uri: str, rec: Record, quarantine: bool,
                 hashed: int | None = None) -> tuple[bool, str | None, str | None]:
        """Take ``rec``'s file out of readers' reach and fetch the object again: (done, quarantine path,
        error). Nothing is forgotten before the file is out of the readable path (``Space.withdraw``).

        ``hashed``: the inode that was found wrong. Not done if another file is at the path now, or a new
        copy is being published (renamed over the path before its record replaces ``rec``): the bytes
        hashed may be that new copy's, checked against the old record."""
        with self._space.exclusive():
            if hashed is not None:
                try:
                    now_at = os.stat(self._store.layout.abspath(rec.path), follow_symlinks=False).st_ino
                except FileNotFoundError:
                    now_at = None
                if now_at != hashed or self._schedule.is_fetching(uri):
                    return False, None, None
            done, where, error = self._space.withdraw(uri, rec, quarantine)
            if done:
                self._schedule.refetch(from_identity(uri))
        return done, where, error

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
