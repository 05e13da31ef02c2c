"""Who may hold ``ctl.sock`` connections, and for how long without asking anything.

The daemon's control socket is open to every member of its group. So that one member cannot take every
slot, ``Admission`` decides, for the I/O thread of control.py:

* per uid: a peer uid other than root's and the daemon's own may hold at most ``max_per_uid`` open
  connections; one more is refused: answered one Busy line and closed (``refuse``);
* idle: a connection that sends no complete request line within ``idle_timeout`` seconds of being
  accepted is named by ``idle`` for the server to close (checked at most once a second, or every half
  ``idle_timeout`` when that is shorter).

Invariants (I/O thread only, no lock): ``per_uid[uid]`` is the number of admitted connections of
``uid`` not yet ``released`` (absent when 0); ``silent`` holds exactly the admitted, unreleased
connections that have not ``spoke``n yet, with when each was admitted. Counters go to the server's
``stats`` (``refused_uid``; ``closed_idle`` is counted by the server as it closes them).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Protocol

from s3cache.reader.wire import E_BUSY, encode


class Peer(Protocol):
    """A connection as admission sees it: its peer's uid (SO_PEERCRED)."""

    uid: int


class Admission:
    def __init__(self, max_per_uid: int, idle_timeout: float, stats: dict[str, int]) -> None:
        self.max_per_uid = max_per_uid
        self.idle_timeout = idle_timeout
        self._stats = stats
        self.per_uid: dict[int, int] = {}  # open connections per peer uid
        self.silent: dict[Peer, float] = {}  # connections yet to send a request -> when admitted
        self._next_idle_check = 0.0

    def admit(self, conn: Peer) -> bool:
        """Count ``conn`` in, or False (counted as ``refused_uid``) when its uid holds its share already.
        Root and the daemon's own uid are never limited."""
        if conn.uid not in (0, os.geteuid()) and self.per_uid.get(conn.uid, 0) >= self.max_per_uid:
            self._stats["refused_uid"] += 1
            return False
        self.per_uid[conn.uid] = self.per_uid.get(conn.uid, 0) + 1
        self.silent[conn] = time.monotonic()
        return True

    def refuse(self, sock: socket.socket, uid: int) -> None:
        """Tell a refused connection why (one Busy line); the caller closes it."""
        try:  # one line into an empty socket buffer: never blocks
            sock.send(encode({"error": f"uid {uid} has {self.max_per_uid} connections to the daemon "
                                       f"open already: close some", "code": E_BUSY}))
            while sock.recv(1 << 16):  # what it sent already: closed unread, the kernel would
                pass                   # reset the client's side and drop our answer with it
        except OSError:
            pass

    def spoke(self, conn: Peer) -> None:
        """``conn`` sent a complete request line: no longer subject to the idle timeout."""
        self.silent.pop(conn, None)

    def released(self, conn: Peer) -> None:
        """An admitted ``conn`` closed: its uid's slot is free again."""
        self.silent.pop(conn, None)
        left = self.per_uid.get(conn.uid, 1) - 1
        if left > 0:
            self.per_uid[conn.uid] = left
        else:
            self.per_uid.pop(conn.uid, None)

    def idle(self) -> list[Peer]:
        """The silent connections past ``idle_timeout``, for the server to close (none between checks)."""
        now = time.monotonic()
        if now < self._next_idle_check or not self.silent:
            return []
        self._next_idle_check = now + min(1.0, self.idle_timeout / 2)
        return [c for c, since in self.silent.items() if now - since > self.idle_timeout]
