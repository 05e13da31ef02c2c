"""Readers' leases as the space keeps them, for ``Space`` (space.py), which takes this in as a mixin (like
pins.py and room.py): the leases in force (``policy.leases.Leases``), with their settings copied from the
daemon's; the leases owed on files not ready yet (a reader waits on one, or took it between its rename
and its commit), which start when the file lands; and the leases kept across a restart (kept_leases.py).

Invariants it keeps:

* a lease counts monotonic time (a step of the wall clock never ends or stretches one);
* a lease owed on a file not ready is kept for at most ``MAX_AWAITING`` processes per file and
  ``MAX_AWAITED_FILES`` files (holder names and URIs come from readers: bounded), and dropped when the
  file lands (the lease starts, at the place in the reader's order its want took), its download ends
  without a file while no want of that reader still waits on it (``_unawait``; a want still waiting is
  answered when the object is fetched again), the wants on it are answered with a failure
  (``forget_owed``), or the reader stops waiting on it without having taken it (``disown``: its last
  connection waiting on it closed); a re-admission for another size is none of these;
* the leases in force are written to the index only when they changed since the last write.

Uses the attributes ``Space`` sets (``store``, ``index``); callers hold the state lock, except for
``_save_leases`` (the index write, outside it). Imports no other daemon part.
"""

from __future__ import annotations

import os
import time

from s3cache.policy.leases import LEASE_RECENT, LEASE_UID_SHARE, Leases, lease_budget
from s3cache.service.config import Settings
from s3cache.store.files import Store
from s3cache.store.index import Index

from . import kept_leases

MAX_AWAITING = 256  # processes whose lease on one file not yet ready is kept for when it lands
MAX_AWAITED_FILES = 100_000  # files not yet ready with leases owed on them


class Leasing:
    """Leases for ``Space`` (a mixin: see the module doc)."""

    store: Store

    def _open_leases(self, settings: Settings, store: Store, index: Index) -> None:
        """The leases for these settings, with those a previous run saved restored (``kept_leases``).
        Holders are processes (uid:pid); a uid other than root and ours holds at most half the cache."""
        self.leases = Leases(settings.lease, lease_budget(settings.max_size, store.total_bytes()),
                             recent=LEASE_RECENT, uid_cap=min(settings.max_size, store.total_bytes()) // LEASE_UID_SHARE,
                             uncapped=("0", str(os.geteuid())))
        kept_leases.restore(index, self.leases)  # promised before a restart: kept after it
        self._leases_saved = self.leases.changes
        # Readers that took a file not yet ready: uri -> reader -> its place in that reader's order.
        self._awaited: dict[str, dict[str, int]] = {}
        # Of those, the ones readers' wants made: uri -> reader -> (its connections waiting on it, the
        # places its wants took). Keys are always some of ``_awaited``'s.
        self._waiting: dict[str, dict[str, tuple[set, set[int]]]] = {}

    def _apply_leases(self, settings: Settings) -> None:
        """SIGHUP's live settings, to the copies the leases made of them."""
        self.leases.lease = settings.lease
        self.leases.budget = lease_budget(settings.max_size, self.store.total_bytes())
        self.leases.uid_cap = min(settings.max_size, self.store.total_bytes()) // LEASE_UID_SHARE

    def _await(self, uri: str, reader: str) -> None:
        """``reader`` took ``uri`` before it is ready: its lease starts when it lands, at the place in
        its order this call takes (``Leases.ticket``)."""
        if len(self._awaited) >= MAX_AWAITED_FILES and uri not in self._awaited:
            oldest = next(iter(self._awaited))  # the oldest, not the reader's newest
            del self._awaited[oldest]
            self._waiting.pop(oldest, None)
        holders = self._awaited.setdefault(uri, {})
        if reader in holders or len(holders) < MAX_AWAITING:  # holders are processes: bounded
            holders[reader] = self.leases.ticket()

    def _lease_ready(self, reader: str, uri: str, size: int) -> None:
        """``reader`` may open the ready ``uri`` from now on: its newest file."""
        self.leases.saw(reader, uri, size, time.monotonic())

    def _lease_awaited(self, uri: str, size: int, now: float) -> None:
        """``uri`` landed (at ``now``, monotonic): the leases owed on it start, each in its reader's
        order where the reader took it (it may have moved on since)."""
        self._waiting.pop(uri, None)
        for reader, place in self._awaited.pop(uri, {}).items():
            self.leases.saw(reader, uri, size, now, place=place)

    def owe_to(self, conn: object, reader: str, uri: str) -> None:
        """``conn`` (a reader's connection) waits on ``uri`` for ``reader``, whose lease owed on it
        (``touch``) ends when the last such connection closes (``disown``), unless it took the file."""
        place = self._awaited.get(uri, {}).get(reader)
        if place is not None:
            conns, places = self._waiting.setdefault(uri, {}).setdefault(reader, (set(), set()))
            conns.add(conn)
            places.add(place)

    def disown(self, conn: object, uri: str) -> None:
        """``conn`` closed while waiting on ``uri``: a reader none of whose connections waits on it any
        more is owed no lease there, unless it took the file since (a usage note between its rename and
        its commit: the process has it, and its place then is none of those its wants took)."""
        waiting = self._waiting.get(uri, {})
        for reader, (conns, places) in list(waiting.items()):
            conns.discard(conn)
            if conns:
                continue
            del waiting[reader]
            holders = self._awaited.get(uri, {})
            if holders.get(reader) in places:
                del holders[reader]
                if not holders:
                    del self._awaited[uri]
        if not waiting:
            self._waiting.pop(uri, None)

    def _unawait(self, uri: str) -> None:
        """``uri``'s download ended without a file: no lease is owed on it any more, except to readers
        whose wants still wait on it (a transient failure, a full disk, a reload's refetch: it is fetched
        again and they are answered when it lands, so the file must stay theirs from then until they
        open it). ``forget_owed`` ends those too, once their wants are answered without a file."""
        waiting = self._waiting.get(uri)
        holders = self._awaited.pop(uri, None)
        if not waiting or not holders:
            self._waiting.pop(uri, None)
            return
        kept = {reader: place for reader, place in holders.items() if reader in waiting}
        if kept:
            self._awaited[uri] = kept
        else:
            self._waiting.pop(uri, None)

    def forget_owed(self, uri: str) -> None:
        """The wants on ``uri`` were answered without a file (it failed for them): no lease is owed on
        it to anyone."""
        self._awaited.pop(uri, None)
        self._waiting.pop(uri, None)

    def leased_now(self) -> set[str]:
        """The URIs leases hold now (``Leases.held``)."""
        return self.leases.held(time.monotonic())

    def _leases_to_save(self) -> tuple[int, list[list] | None]:
        """(the leases' change count, their rows if they changed since the last save) (state lock held)."""
        changes = self.leases.changes
        return changes, self.leases.snapshot(time.monotonic()) if changes != self._leases_saved else None

    def _save_leases(self, index: Index, changes: int, rows: list[list]) -> None:
        """Write ``_leases_to_save``'s rows (outside the state lock)."""
        kept_leases.save(index, rows)
        self._leases_saved = changes
