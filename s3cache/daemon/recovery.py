"""Recovery at start: make the index and the disk agree (``open_index``, ``reconcile``, ``rebuild``).

Invariants it keeps:

* reconcile never asks S3 about ready files (a restart re-downloads nothing verified) and re-hashes only
  those modified since they were fetched; a ready file of another size than was verified, or modified
  with other bytes, is never served; a ``publishing`` row is settled by its file's size and local
  CRC32C, never trusted as is;
* rebuild indexes a file only if it passes a checksum (the manifest's, or S3's from one HEAD): size
  alone is not enough to trust a file nobody watched being written;
* a file S3 could not vouch for is never served: it waits in the quarantine dir (``held``, saved in the
  index's ``unverified`` meta row) until a later start re-checks it, and comes back only through the
  publish order (intent, rename, ready);
* no GET is made: at most one HEAD per file that has no checksum in the manifest.

State: ``held`` (files kept aside unverified). Start-up only, before readers are let in; the state lock
is taken only to load the space (short). Checking files while serving (``verify``, ``--revalidate``)
is ``maintenance``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from s3cache.errors import ChecksumMismatch, FetchFailed, S3CacheError
from s3cache.fetch.checksum import Expectation, digest_file, local_crc32c_of
from s3cache.fetch.retry import Cancelled
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import from_identity, make_ref
from s3cache.store.files import Store
from s3cache.store.index import (
    PUBLISHING,
    READY,
    Index,
    IndexCorrupt,
    Record,
    claims_of,
)
from s3cache.store.layout import SUPERSEDED_BIT
from s3cache.store.paths import HASHED_DIR, PRIVATE_DIR, readable_path

from .space import Space

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


def _changed_on_disk(path: str, rec: Record) -> str | None:
    """Why a ready file is not the one that was verified, or None. Its size must be the record's; one
    modified after it was fetched (mtime later than ``fetched_at``) is re-hashed against its local
    CRC32C, so a file truncated, extended or rewritten in place while the daemon was down is caught at
    start rather than served. A file never touched costs one stat."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if st.st_size != rec.size:
            return f"{st.st_size} bytes, {rec.size} when it was verified"
        if rec.fetched_at and st.st_mtime > rec.fetched_at and local_crc32c_of(path) != rec.crc32c:
            return "modified since it was fetched, and its CRC32C differs"
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    return None


def _marked_superseded(path: str) -> bool:
    """The file carries ``SUPERSEDED_BIT`` (``Store.mark_superseded``): its object changed in S3."""
    try:
        return bool(os.lstat(path).st_mode & SUPERSEDED_BIT)
    except OSError:
        return False


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


class Recovery:
    """Start-up's side of maintenance over one cache dir and its index (see the module docstring)."""

    def __init__(self, store: Store, index: Index, space: Space, cond: threading.Condition, *,
                 describe: Callable) -> None:
        self._store = store
        self._index = index
        self._space = space
        self._cond = cond
        self._describe = describe  # Fetcher.describe: one HEAD
        self.held: dict[str, tuple[str, str]] = {}  # uri -> (its path, where it waits unverified)
        self.superseded: list[str] = []  # ready files reconcile found marked superseded: to fetch again

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
            if _marked_superseded(self._store.layout.abspath(rel)):
                log.info("%s was marked superseded (S3 holds a newer version): removing it", rel)
            elif bucket != HASHED_DIR:
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
                                                  ("crc64nvme", entry.crc64nvme), ("crc32c", entry.crc32c),
                                                  ("crc32", entry.crc32)) if v]
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
        where, error = self._store.take_out(rel, quarantine=True)
        if error:
            log.error("setting %s aside: %s (an unverified file is never served)", rel, error)
        if where is not None:
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
        and local CRC32C; ``ready`` rows whose file is gone, or changed (``_changed_on_disk``), are dropped
        (a changed file quarantined), so the object is fetched again. A row marked superseded keeps its
        file out of readers' reach (its mark set again, or the file removed) and is listed in
        ``superseded`` for the caller to fetch again.
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
            elif (problem := _changed_on_disk(path, rec)) is not None:
                where, error = self._store.take_out(rec.path, quarantine=True)
                log.error("%s changed on disk since it was verified (%s); %s, fetching it again", uri, problem,
                          f"quarantined at {where}" if where else error or "removed")
                drop.append(uri)
                continue
            elif rec.superseded and not self._store.mark_superseded(rec.path):
                # The row says S3 has a newer version; the file's mark (set after the row, maybe not
                # before a crash) could not be set now: the old bytes must not be found by readers.
                self._store.remove(rec.path)
                drop.append(uri)
                continue
            if rec.superseded:
                self.superseded.append(uri)
            keep.append((uri, rec))
        with self._cond:
            self._space.load(keep)
        if promote:
            self._index.put_many(promote)
        if drop:
            self._index.delete_many(drop)
        if promote or drop:
            log.info("reconciled index: %d interrupted publish(es) completed, %d missing or changed file(s) "
                     "re-queued",
                     len(promote), len(drop))
