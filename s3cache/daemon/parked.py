"""Wants parked while the manifest is being edited, for ``Readers`` (readers.py), which takes this in as a
mixin (like announce.py): a want outside the demand scope while the manifest on disk is not the one
installed (a job appended its object and asked at once) waits for that edit to be installed instead of
being refused at once.

Invariants it keeps:

* a parked want gets exactly one answer: "ready" (cached meanwhile), fetched like any want once the
  installed manifest puts it in scope, or "failed" with ``OutOfScope`` once its edit is installed
  without it, was abandoned, or it waited ``SCOPE_WAIT_MAX``; or its connection closes (``Readers.closed``
  takes it out);
* at most ``MAX_PARKED`` objects are parked (a reader's wants cannot grow the daemon's memory).

Uses the attributes ``Readers`` sets (``_parked``, ``_edited``, ``_scope``, ``_schedule``, ``_space``,
``_cond``, ``out_of_scope``) and its ``_tell`` and ``_wait_on``; callers hold the state lock, except for
``expire_parked``, which takes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from s3cache.errors import OutOfScope
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.sockets.control import Connection

# A want outside the demand scope while the manifest on disk is not the one installed (a job appended
# its object and asked at once) waits for the edit to be installed, at most this long, at most this many.
SCOPE_WAIT_MAX = 120.0
MAX_PARKED = 10_000


class Parked:
    """The parked wants of ``Readers`` (see the module docstring)."""

    def _park(self, ref: ObjectRef, conn: Connection, edited: Callable[[], bool]) -> bool:
        """Hold a want outside the scope while the manifest is being edited (``edited``); False: refuse
        it now."""
        if ref.uri not in self._parked and (len(self._parked) >= MAX_PARKED or not edited()):
            return False
        self._parked.setdefault(ref.uri, (ref, time.monotonic(), set()))[2].add(conn)
        return True

    def expire_parked(self) -> None:
        """Once a second (takes the state lock): refuse parked wants whose edit is installed without
        them, was abandoned, or that waited SCOPE_WAIT_MAX. The manifest watch is asked (a stat, a
        listing for a directory) before the lock is taken."""
        if not self._parked:  # read without the lock: a hint, judged again under it
            return
        asked = time.monotonic()
        edited = self._edited()
        with self._cond:
            self.rejudge_parked(expire=True, edited=edited, asked=asked)

    def rejudge_parked(self, expire: bool, edited: bool = True, asked: float = 0.0) -> None:
        """Judge the parked wants again (state lock held): after a manifest was installed (``expire``
        False), and once a second (``expire`` True, from ``expire_parked``: a want whose edit is
        installed or abandoned (``edited`` False when asked at ``asked``: a want parked after that is for
        a newer edit), or that waited SCOPE_WAIT_MAX, is refused). Now in scope: fetched for its readers
        like any want."""
        if not self._parked:
            return
        now = time.monotonic()
        front: list[Entry] = []
        promoted = False
        for uri, (ref, since, conns) in list(self._parked.items()):
            path = self._space.ready_path(uri)
            if path is not None:  # cached meanwhile (a fetch of a job just retired landed): served
                del self._parked[uri]
                self._tell(conns, {"event": "ready", "uri": uri, "path": path})
            elif self._scope.allows(ref, self._schedule.catalog):
                del self._parked[uri]
                promoted |= self._wait_on(ref, conns, front, since)
            elif expire and ((not edited and since <= asked) or now - since > SCOPE_WAIT_MAX):
                del self._parked[uri]
                self.out_of_scope += 1
                self._tell(conns, {"event": "failed", "uri": uri, "code": OutOfScope.code,
                                   "message": self._scope.rule()})
        if front:
            self._schedule.push_front(front)
        if front or promoted:  # queued work, or prefetch slots a reader's want freed
            self._cond.notify_all()
