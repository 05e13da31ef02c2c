"""Maintenance: check that cached files are still right, and make the index and the disk agree at start.

``s3cache verify`` (``verify``) and ``--revalidate`` (``revalidate_loop``) are here. A file found wrong
is withdrawn (``withdraw``): quarantined or removed, its row dropped, and the object fetched again.
Start-up (``open_index``, then ``reconcile`` or ``rebuild``) is ``recovery.Recovery``, which this part
owns and whose methods it offers under the same names.

Invariants it keeps:

* a file is withdrawn only if it is still the one that was checked (same path, same inode, no new copy
  being published), under the lease lock, file before row (``Space.withdraw``);
* a changed object (only a definitive answer counts: another ETag or size) is marked superseded before
  ``verify`` reports it, durably (the index row, then the file's mode for readers' fast path), and
  fetched again: from then on no new ``resolve`` is handed the old file, whose bytes stay only for
  readers that already have it, until the new version replaces it (``supersede``);
* recovery's invariants (recovery.py): nothing verified is re-downloaded, nothing unverified is served.

State: none of its own beyond its collaborators. Locks: the state lock only through the space and the
schedule (short snapshots), and the lease lock then the state lock around a withdrawal
(``Space.exclusive``); hashing and S3 requests run with no lock held.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace

from s3cache.errors import FetchFailed, S3CacheError
from s3cache.fetch.checksum import digest_file
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import from_identity
from s3cache.store.files import Store
from s3cache.store.index import Index, Record

from .failures import SLOW, is_permanent
from .recovery import DEFINITIVE, HELD, Recovery, cached_files, open_index  # noqa: F401 (re-exported)
from .schedule import Schedule
from .space import Space

log = logging.getLogger("s3cache.daemon")


class Maintenance:
    """The daemon's maintenance part: recovery at start (delegated to ``Recovery``), ``verify``,
    ``withdraw`` and ``--revalidate`` while serving (see the module docstring for its invariants)."""

    def __init__(self, store: Store, index: Index, space: Space, schedule: Schedule,
                 cond: threading.Condition, *, describe: Callable) -> None:
        self._store = store
        self._index = index
        self._space = space
        self._schedule = schedule
        self._cond = cond
        self._describe = describe  # Fetcher.describe: one HEAD
        self._recovery = Recovery(store, index, space, cond, describe=describe)

    # == start-up (recovery.py) =======================================================================

    @property
    def held(self) -> dict[str, tuple[str, str]]:
        """Files a rebuild kept aside unverified: uri -> (its path, where it waits)."""
        return self._recovery.held

    def rebuild(self, catalog: Catalog) -> None:
        """``Recovery.rebuild``: re-verify every file on disk and index those that pass."""
        self._recovery.rebuild(catalog)

    def reconcile(self, catalog: Catalog | None = None) -> None:
        """``Recovery.reconcile``: make the index agree with the disk without re-hashing ready files;
        the files it found marked superseded are fetched again (their mark outlives restarts)."""
        self._recovery.reconcile(catalog)
        with self._cond:
            for uri in self._recovery.superseded:
                rec = self._space.ready.get(uri)
                if rec is not None and rec.superseded:
                    self._schedule.replace(uri)
        self._recovery.superseded.clear()

    def recheck_held(self, catalog: Catalog) -> None:
        """``Recovery.recheck_held``: re-check files kept aside while S3 could not vouch for them."""
        self._recovery.recheck_held(catalog)

    def status(self) -> dict:
        """This part's piece of ``status``."""
        return self._recovery.status()

    # == checking cached files ========================================================================

    def verify(self, uris: list[str], everything: bool, source: bool) -> dict:
        """Re-hash cached files against their recorded CRC32C; with ``source``, also ask S3 (HEAD)
        whether each object changed since it was cached. A mismatch is moved to the quarantine folder
        (removed if it cannot be) and the object fetched again; a file that could be neither stays and
        is reported with the error. A changed object is marked superseded and fetched again
        (``supersede``): only a definitive answer (another ETag or size) counts; its old file is no
        longer handed out, and stays for readers that already have it until the new version replaces
        it. ``source`` costs one HEAD per
        object; an object S3 gives no usable answer about is listed under ``errors`` and the others are
        still checked. Returns a report."""
        with self._cond:
            if everything:
                targets = self._space.records()
            else:
                targets = self._space.records(from_identity(x).uri for x in uris)
                missing = [x for x in uris if not self._space.is_ready(from_identity(x).uri)]
        report: dict = {"checked": 0, "ok": 0, "mismatched": [], "changed": [], "gone": [], "errors": [],
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
                    self._schedule.wait_ended(uri, timeout=60)
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
                    now_is = self._describe(entry, checks=False)  # one HEAD: its size and ETag are all we use
                except FetchFailed as e:
                    if is_permanent(e.code) or e.code in SLOW:  # S3 answered about the object itself
                        report["gone"].append({"uri": uri, "code": e.code})
                        continue
                    # Retries ran out (a 500, a timeout): S3 said nothing about the object itself.
                    log.warning("verify: cannot ask S3 about %s: %s", uri, e)
                    report["errors"].append({"uri": uri, "error": str(e)[:300]})
                    continue
                except S3CacheError as e:  # one object's odd answer says nothing about the others
                    log.warning("verify: cannot ask S3 about %s: %s", uri, e)
                    report["errors"].append({"uri": uri, "error": str(e)[:300]})
                    continue
                if (now_is.etag and rec.etag and now_is.etag != rec.etag) or now_is.size != rec.size:
                    self.supersede(uri, rec, ino)
                    log.info("verify: %s changed in S3 since it was cached; fetching it again (the cached "
                             "file is no longer handed out; readers asking wait for the new one)", uri)
                    report["changed"].append({"uri": uri, "etag": now_is.etag, "was": rec.etag})
                    continue
            report["ok"] += 1
        return report

    def supersede(self, uri: str, rec: Record, hashed: int | None = None) -> None:
        """S3 holds another object than ``rec``'s file: mark it superseded (durably, then on the file
        for readers' fast path: ``Store.mark_superseded``) and fetch the object again. From the return
        on, no new ``resolve`` (fast path, ``want``, a peer) is handed the old file: readers asking wait
        for the new version or get the error that ends its fetch; a reader that already has the file
        keeps reading it. The row is marked before the file (a SIGKILL between: reconcile marks the file
        at start). A file already evicted or replaced by a new version is left alone. Where the mark
        cannot be kept (the row changed under us, or the filesystem drops the bit) the old file is taken
        out of readers' reach instead (``withdraw``). ``hashed``: the old file's inode, when known; a file
        at the path with another inode (a new copy renamed over it) is never marked."""
        marked = self._index.mark_superseded(uri, rec)  # an fsync: outside the locks
        with self._space.exclusive():  # no reader between seeing the file and telling us
            # Readers handed the old file before now keep their lease on it; later wants lease the new one.
            self._space.apply_notes()
            cur = self._space.ready.get(uri)
            if cur is None or not _same(cur, rec):
                return  # evicted, or the new version published meanwhile
            self._space.ready[uri] = replace(cur, superseded=True)  # ``want`` and peers: not handed out
            self._schedule.replace(uri)
            if marked and self._store.mark_superseded(cur.path, hashed):
                return
            if self._schedule.is_fetching(uri):
                # A new copy is on its way, maybe renamed over the path already (its ``publishing`` row
                # replaced this one): that file is not the one to mark, and its commit replaces ``cur``.
                return
            done, _, error = self._space.withdraw(uri, cur, quarantine=False)  # fetched again: ``replace``
        if not done:
            log.error("verify: %s changed in S3 and its old copy could be neither marked nor removed: %s", uri,
                      error)

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

    def retire_superseded(self, uri: str, code: str, shown: str) -> None:
        """The new version of a cached object failed for good (``code``): the old copy, known to be
        superseded, is not served as current any longer; a reader asking gets the failure instead.
        ``shown``: the URI as the log shows it. Takes the lease lock, then the state lock."""
        with self._space.exclusive():
            rec = self._space.ready.get(uri)
            if rec is None or self._schedule.is_fetching(uri):
                return  # gone already, or a reader's ask is fetching it again
            done, _, error = self._space.withdraw(uri, rec, quarantine=False)
        if done:
            log.warning("%s changed in S3 and its new version cannot be cached (%s): the old copy is removed, "
                        "not served as current", shown, code)
        else:
            log.error("%s changed in S3 and its new version cannot be cached (%s), but the old copy could "
                      "not be removed: %s", shown, code, error)

    def revalidate_loop(self, stopping: threading.Event, every: float) -> None:
        """``--revalidate``: every ``every`` seconds, ask S3 whether cached manifest objects changed
        (not those known changed, whose new version is on its way: one HEAD per object found changed)."""
        while not stopping.wait(every):
            with self._cond:
                catalog, ready = self._schedule.catalog, self._space.ready
                # A superseded copy's refetch is pending: S3 has told us already, until the new one lands.
                uris = [u for u in self._space.ready_uris() if u in catalog and not ready[u].superseded]
            try:
                report = self.verify(uris, False, True)
            except Exception:
                log.exception("revalidation failed")
                continue
            if report["changed"] or report["mismatched"]:
                log.info("revalidated %d file(s): %d changed in S3, %d corrupt", report["checked"],
                         len(report["changed"]), len(report["mismatched"]))


def _same(a: Record, b: Record) -> bool:
    """The same cached file: same place, same fetch, same bytes (as ``Space.withdraw`` tells them)."""
    return (a.path, a.fetched_at, a.crc32c) == (b.path, b.fetched_at, b.crc32c)
