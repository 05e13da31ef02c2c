"""One ctl.sock client on the daemon's side: its buffers, its request inbox and its outbound queue.

``Connection.send`` is how the daemon answers and pushes events to a client from any thread, under any
lock: it only appends to a bounded queue, and the server's I/O thread (control.py) is the only code that
reads or writes the socket. The limits here bound what one client can make the daemon hold: at most
``MAX_INBOX`` complete request lines, ``wire.MAX_LINE`` bytes of a partial line, and ``max_outbound``
bytes of unread answers (past ``SOFT_OUTBOUND`` the server stops reading its requests; past
``MAX_OUTBOUND`` it is dropped).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING

from s3cache.reader.wire import encode

if TYPE_CHECKING:
    from .control import Server

MAX_OUTBOUND = 8 << 20  # bytes queued for one client before it is dropped as fallen behind
SOFT_OUTBOUND = 256 << 10  # past this, stop reading that client's requests until it reads its answers
MAX_INBOX = 4  # complete request lines buffered per connection before reading pauses


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from SO_PEERCRED."""
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return (0, -1, -1)


class Connection:
    """One ctl.sock client on the daemon's side.

    Invariants: only the server's I/O thread touches ``sock``; ``send`` only appends to the outbound queue
    (at most ``max_outbound`` bytes, past which the connection is dropped), so it never blocks and is safe
    from any thread under any lock; this connection's requests run one at a time and in order (``_inbox``,
    ``_busy``), so answers leave in request order, with pushed events interleaved in ``send`` order.
    """

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self.sock = sock
        self.pid, self.uid, self.gid = _peer(sock)
        self._lock = threading.Lock()
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._inbuf = bytearray()
        self._inbox: deque[bytes] = deque()
        self._busy = False  # a handler thread owns this connection's requests
        self._closed_done = False  # on_close has been called (or scheduled)
        self._events = 0  # what the selector watches for (I/O thread only)
        self.closed = False

    def send(self, msg: dict) -> bool:
        """Queue ``msg`` for the client. False if the connection is closed or was just dropped for
        having fallen more than ``max_outbound`` bytes behind."""
        data = encode(msg)
        with self._lock:
            if self.closed:
                return False
            overflow = self._out_bytes + len(data) > self._server.max_outbound
            if not overflow:
                self._out.append(data)
                self._out_bytes += len(data)
        if overflow:
            self._server._drop(self, f"fell {self._out_bytes} bytes behind (pid {self.pid})")
            return False
        self._server._touch(self)
        return True

    @property
    def queued_bytes(self) -> int:
        return self._out_bytes
