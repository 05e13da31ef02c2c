"""The durable index: one diskcache row per object that has (or is about to have) a file on disk.

Only durable facts live here. ``publishing`` is an intent written before a verified file is renamed
into place; ``ready`` is written after the rename and the directory fsync. Queued and fetching are the
daemon's live view (derived from the manifest minus this index), so a crash cannot leave them lying.

Rows are written in group transactions (one fsync for many objects): per-object bookkeeping must stay
cheap when objects are small and many.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import diskcache

from s3cache.errors import CacheDirError

if TYPE_CHECKING:
    from s3cache.manifest.parse import Entry

_META = "\x00meta:"  # a prefix no s3:// URI can start with
PUBLISHING = "publishing"
READY = "ready"
SCHEMA = 3  # 2: rows carry ``claims``; 3: ``superseded``; rows of older schemas load with them empty


def claims_of(entry: Entry) -> str:
    """The manifest's checksum claims about an object, as one canonical string ("" when it makes none):
    what a cached file was verified against, so that a manifest changing only a checksum is noticed."""
    return ";".join(f"{name}={v}" for name in ("sha256", "md5", "crc32c", "crc64nvme", "crc32")
                    if (v := getattr(entry, name)))


@dataclass(frozen=True)
class Record:
    """What the cache knows about one object's file. ``path`` is relative to the cache dir.

    ``claims`` is ``claims_of`` the manifest entry the file was fetched and verified for: a later manifest
    whose entry claims something else (another checksum, version or stated size) makes the file stale.

    ``superseded``: S3 was found to hold another object (``verify --source``, ``--revalidate``). The file
    is kept for readers that already have it, never handed out as current again, and the object is
    fetched again; the new version's row replaces this one. Durable so that a restart (or a SIGKILL)
    does not turn the old bytes back into the current ones.
    """

    state: str
    path: str
    size: int
    etag: str = ""
    version: str = ""
    method: str = "size"  # which checksum verified the bytes (see checksum.METHODS)
    crc32c: str = ""  # local CRC32C of the file, for `s3cache verify`
    fetched_at: float = 0.0
    last_used: float = 0.0
    claims: str = ""
    superseded: bool = False

    def stale_for(self, entry: Entry, *, hinted_size: bool = True) -> str | None:
        """Why this file is not the object ``entry`` describes, or None if it is. A size the manifest
        states must match; a size from a listing (``size_is_hint``) counts only with ``hinted_size``: a
        listing newer than the file says the object changed, while at publish a hint older than the
        download must not reject the bytes S3 gave."""
        if entry.version and self.version != entry.version:
            return f"version {self.version or '(latest)'} cached, {entry.version} listed"
        if entry.size is not None and self.size != entry.size and (hinted_size or not entry.size_is_hint):
            return f"{self.size} bytes cached, {entry.size} listed"
        want = claims_of(entry)
        if self.claims != want:
            return f"checked against {self.claims or 'no manifest checksum'}, the manifest now says {want or 'none'}"
        return None

    def to_row(self) -> dict:
        # Every field is a str, int, float or bool: a shallow copy is the row. (``dataclasses.asdict``
        # deep-copies each value, which cost more than the rest of a row's write for small objects.)
        row = dict(self.__dict__)
        row["v"] = SCHEMA
        return row

    @classmethod
    def from_row(cls, row: dict) -> Record:
        return cls(**{k: v for k, v in row.items() if k in _FIELDS})

    def used(self, when: float) -> Record:
        return replace(self, last_used=when)


_FIELDS = frozenset(f.name for f in fields(Record))


class Index:
    """Process-safe, crash-safe map from ``s3://bucket/key`` to Record, backed by diskcache (SQLite)."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.islink(directory):  # the store made it a directory; a link here was planted
            raise CacheDirError(f"index dir {directory} is a symlink; remove it")
        _check(os.path.join(directory, "cache.db"))
        try:
            self._cache = diskcache.Cache(
                directory,
                eviction_policy="none",  # s3cache evicts; diskcache must never drop a row on its own
                size_limit=1 << 62,
                cull_limit=0,
                statistics=0,
                tag_index=0,
                sqlite_synchronous=2,  # FULL: a commit survives power loss, not only a process crash
                disk_min_file_size=1 << 30,  # rows stay inside SQLite, no side files
            )
        except sqlite3.DatabaseError as e:
            raise IndexCorrupt(f"index at {directory} is unreadable: {e}") from e
        except OSError as e:
            raise CacheDirError(f"cannot open index at {directory}: {e.strerror}") from e
        for name in os.listdir(directory):
            os.chmod(os.path.join(directory, name), 0o600)

    def close(self) -> None:
        self._cache.close()

    def get(self, uri: str) -> Record | None:
        row = self._cache.get(uri)
        return Record.from_row(row) if row is not None else None

    def items(self) -> Iterator[tuple[str, Record]]:
        for uri in list(self._cache.iterkeys()):
            if uri.startswith(_META):
                continue
            row = self._cache.get(uri)
            if row is not None:
                yield uri, Record.from_row(row)

    def put_many(self, records: Iterable[tuple[str, Record]]) -> None:
        """Write many rows in one transaction: all of them land, or (after a crash or an error) none."""
        with self._cache.transact():
            ready = False
            for uri, rec in records:
                self._cache.set(uri, rec.to_row())
                ready = ready or rec.state == READY
            if ready and _fault_full():
                # What SQLite raises when the disk under the index fills; the transaction rolls back.
                raise sqlite3.OperationalError(f"database or disk is full ({FAULT_ENV})")

    def settle_many(self, ready: Iterable[tuple[str, Record]], intents: Iterable[tuple[str, Record]] = ()) -> int:
        """In one transaction: each ``ready`` row replaces the row of the same file (same path and fetch
        time) -- a row deleted meanwhile (the file evicted) stays deleted, a superseded mark or a later
        use written on it meanwhile is kept -- then ``intents`` are written. All of it lands, or none.
        Returns how many ``ready`` rows were written."""
        done = 0
        with self._cache.transact():
            for uri, rec in ready:
                row = self._cache.get(uri)
                if row is None or row.get("path") != rec.path or row.get("fetched_at") != rec.fetched_at:
                    continue
                new = rec.to_row()
                new["superseded"] = rec.superseded or bool(row.get("superseded"))
                new["last_used"] = max(rec.last_used, row.get("last_used") or 0.0)
                self._cache.set(uri, new)
                done += 1
            for uri, rec in intents:
                self._cache.set(uri, rec.to_row())
            if done and _fault_full():
                raise sqlite3.OperationalError(f"database or disk is full ({FAULT_ENV})")
        return done

    def touch_many(self, records: Iterable[tuple[str, Record]]) -> int:
        """Set ``last_used`` on rows that still hold exactly these files (same path and fetch time), in
        one transaction; a row deleted or replaced meanwhile is left alone, never written back. Returns
        how many were updated."""
        done = 0
        with self._cache.transact():
            for uri, rec in records:
                row = self._cache.get(uri)
                if row is not None and row.get("path") == rec.path and row.get("fetched_at") == rec.fetched_at:
                    self._cache.set(uri, {**row, "last_used": rec.last_used})
                    done += 1
        return done

    def mark_superseded(self, uri: str, rec: Record) -> bool:
        """Mark ``uri``'s row superseded if it still holds exactly ``rec``'s file (same path and fetch
        time), in one transaction; a row deleted or replaced meanwhile (evicted, or the new version
        published) is left alone. Returns whether the row was marked."""
        with self._cache.transact():
            row = self._cache.get(uri)
            if row is None or row.get("path") != rec.path or row.get("fetched_at") != rec.fetched_at:
                return False
            self._cache.set(uri, {**row, "superseded": True})
            return True

    def delete_many(self, uris: Iterable[str]) -> None:
        with self._cache.transact():
            for uri in uris:
                self._cache.delete(uri)

    def get_meta(self, name: str, default=None):
        """Daemon-wide settings that must survive restarts (e.g. pins), beside the object rows."""
        return self._cache.get(_META + name, default)

    def set_meta(self, name: str, value) -> None:
        self._cache.set(_META + name, value)

    def __len__(self) -> int:
        """Object rows (metadata not counted)."""
        return sum(1 for k in self._cache.iterkeys() if not k.startswith(_META))


# Fault injection for the tests of what follows a failed index write (issue 17 item 13): with
# S3CACHE_FAULT_INDEX_FULL=N in the daemon's environment, the first N transactions that write a ``ready``
# row fail inside the transaction as a full disk makes them fail (rolled back, nothing written). The
# moment matters (after the rename, before the commit), which a filesystem filled from outside cannot hit.
FAULT_ENV = "S3CACHE_FAULT_INDEX_FULL"
_fault_lock = threading.Lock()
_faults_left = [-1]  # read from the environment on first use


def _fault_full() -> bool:
    with _fault_lock:
        if _faults_left[0] < 0:
            _faults_left[0] = int(os.environ.get(FAULT_ENV) or 0)
        if _faults_left[0] == 0:
            return False
        _faults_left[0] -= 1
        return True


class IndexCorrupt(CacheDirError):
    """The index file is damaged; the daemon rebuilds it from the files on disk."""


def _check(db: str) -> None:
    """Raise IndexCorrupt unless SQLite's quick_check passes (a missing file is a fresh index)."""
    if not os.path.exists(db):
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
            con.execute("SELECT count(*) FROM Cache").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise IndexCorrupt(f"index {db} is damaged: {e}") from None
    if verdict != "ok":
        raise IndexCorrupt(f"index {db} is damaged: {verdict}")


def now() -> float:
    return time.time()
