"""The daemon's side of ``use.sock``: usage notes from readers, read by the server's I/O thread as they
come and by ``drain`` (under the daemon's lease lock) up to what was queued when it began. Records are
bounded and checked (see ``wire``); a malformed one is counted and skipped, an oversized one closes its
connection. Each note names its lease holder as the kernel says it (SO_PEERCRED ``uid:pid``), never as
the reader claims: a made-up reader id moves positions at most, it never holds a file."""

from __future__ import annotations

import errno
import fcntl
import os
import selectors
import socket
import struct
import termios
import threading
from typing import TYPE_CHECKING

from s3cache.reader.wire import MAX_RECORD

if TYPE_CHECKING:
    from .control import Server

MAX_PENDING_NOTES = 16_384  # notes read but not drained before reading use.sock stops (drain included)
MAX_PENDING_BYTES = 4 << 20  # and URI bytes in them: a flood costs bounded memory, the rest waits in the kernel
USE_CONN = "use-conn"  # selector data of a reader's connection
EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # accept() out of resources


class UseChannel:
    """The daemon's side of ``use.sock``: every reader connection, read without blocking.

    Invariant: ``drain`` returns every note a reader sent before ``drain`` began, unless notes already
    pending reach ``MAX_PENDING_NOTES``/``MAX_PENDING_BYTES`` (then the rest stays queued, in order, for
    the next drain): it accepts every connection waiting in the listen backlog and reads on each
    connection the bytes queued there when it began, no more (under ``_lock``, which serialises it with
    the I/O thread's reads so no record is split or lost). So a reader that keeps writing cannot keep a
    drain, and the state lock its caller holds, for longer than one socket buffer per connection.
    The I/O thread reads notes as they come and signals them: ``wait`` blocks until notes are waiting,
    and the socket in ``fds()`` is readable while they are (for a ``select`` loop). If notes pile up
    undrained, the I/O thread stops reading (readers' sends then wait in their socket buffers).
    """

    def __init__(self, listener: socket.socket, server: Server, max_connections: int) -> None:
        listener.listen(512)
        listener.setblocking(False)
        self.listener = listener
        self._server = server
        self._max = max_connections
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        # sock -> [reader id "claimed/uid:pid", partial record bytes, "uid:pid" from SO_PEERCRED]
        self._conns: dict[socket.socket, list] = {}
        self._notes: list[tuple[str, str, str]] = []
        self._note_bytes = 0
        self._unwatched: set[socket.socket] = set()  # accepted by drain or paused: not in the selector
        self._dead: list[socket.socket] = []  # at EOF or refused: to unregister and close (I/O thread)
        self._sig_r, self._sig_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.stats = {"malformed_notes": 0, "oversized_notes": 0, "refused_readers": 0, "notes": 0}

    def fds(self) -> list[socket.socket]:
        """Something to ``select`` on: readable while notes wait to be drained. Prefer ``wait``."""
        return [self._sig_r]

    def wait(self, timeout: float | None) -> bool:
        """Block until notes are waiting (True) or ``timeout`` passes (False)."""
        with self._ready:
            return self._ready.wait_for(lambda: bool(self._notes), timeout)

    def drain(self) -> list[tuple[str, str, str]]:
        """(reader, kind, uri) for every note readers have sent so far, in order per reader."""
        with self._lock:
            self._accept_all(in_io=False, locked=True)
            queued = {sock: _queued(sock) for sock in self._conns}  # what was there when drain began
            for sock, n in queued.items():
                if self._full():
                    break  # the rest stays in the kernel, in order, for the next drain
                self._read(sock, until_empty=True, limit=n)
            out, self._notes, self._note_bytes = self._notes, [], 0
            try:
                while self._sig_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        self._server._wake()  # paused or newly accepted connections go back in the selector
        return out

    # -- reading (I/O thread or drain) --------------------------------------------------------------------

    def _accept_all(self, in_io: bool, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                return self._accept_all(in_io, locked=True)
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in EXHAUSTED or not self._take_one_with_reserve():
                    self._server.stats["accept_errors"] += 1
                    return
                continue
            if len(self._conns) >= self._max:
                # Too many readers: take what this one sent, then close it. It reconnects per note.
                self.stats["refused_readers"] += 1
                self._read_and_close(sock)
                continue
            sock.setblocking(False)
            self._conns[sock] = _state(sock)
            if in_io:
                self._server._sel.register(sock, selectors.EVENT_READ, USE_CONN)
            else:
                self._unwatched.add(sock)

    def _take_one_with_reserve(self) -> bool:
        """Out of descriptors: free the spare one, accept a reader, read its notes, close it, take the
        spare back. A note in the backlog is never left behind because the daemon ran out of files."""
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        self._server.stats["accept_errors"] += 1
        os.close(self._reserve)
        self._reserve = None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return False
        else:
            self._read_and_close(sock)
            return True
        finally:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def _read_and_close(self, sock: socket.socket) -> None:
        """Keep the notes of a reader we will not watch (never registered in the selector).

        Reading shut first: a note the reader sends from then on fails (EPIPE) and it sends it again on
        a new connection; without it, a note that landed between the last read and the close had been
        sent, as far as the reader knew, and was lost with its lease."""
        try:
            sock.shutdown(socket.SHUT_RD)  # what is queued stays readable; then recv answers EOF
        except OSError:
            pass
        sock.setblocking(False)
        self._conns[sock] = _state(sock)
        self._read(sock, until_empty=True)  # bounded: reading is shut, nothing more can arrive
        self._conns.pop(sock, None)
        if sock in self._dead:
            self._dead.remove(sock)
        sock.close()

    def _readable(self, sock: socket.socket, in_io: bool) -> None:
        with self._lock:
            if sock not in self._conns:
                return
            if self._full():
                self._server._sel.unregister(sock)  # nobody drains: let the readers' buffers hold them
                self._unwatched.add(sock)
                return
            self._read(sock, until_empty=False)

    def _full(self) -> bool:
        return len(self._notes) >= MAX_PENDING_NOTES or self._note_bytes >= MAX_PENDING_BYTES

    def _read(self, sock: socket.socket, until_empty: bool, limit: int | None = None) -> None:
        """Read ``sock``: one recv, or until it is empty (or ``limit`` bytes were read, or the notes
        are full)."""
        state = self._conns.get(sock)
        if state is None:
            return
        while True:
            # Never more than the room left: a note is at least 3 bytes ("h" + a character + NUL), so
            # the notes stay within their cap (the one completing a carried-over partial record aside).
            room = min(3 * (MAX_PENDING_NOTES - len(self._notes)), MAX_PENDING_BYTES - self._note_bytes)
            want = min(1 << 16, room if limit is None else min(limit, room))
            if want <= 0:
                return
            try:
                data = sock.recv(want)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                if state[1]:
                    self.stats["malformed_notes"] += 1  # a record cut off by the reader's exit
                self._retire(sock)
                return
            if not self._parse(state, data):
                self._retire(sock)
                return
            if limit is not None:
                limit -= len(data)
            if not until_empty or self._full():
                return

    def _parse(self, state: list, data: bytes) -> bool:
        """Add the complete records in ``data`` to the notes. False: a record is over the limit."""
        buf = state[1]
        buf += data
        records = buf.split(b"\0")
        state[1] = bytearray(records.pop())
        was_empty = not self._notes
        for rec in records:
            if len(rec) > MAX_RECORD:
                self.stats["oversized_notes"] += 1
                return False
            kind = rec[:1]
            try:
                text = rec[1:].decode("utf-8")
            except UnicodeDecodeError:
                self.stats["malformed_notes"] += 1
                continue
            if kind == b"R":
                # Positions are the claimed process's; the lease is the kernel's process (see the doc).
                state[0] = lease_name(text, state[2])
            elif kind in (b"h", b"w") and text:
                self._notes.append((state[0], kind.decode(), text))
                self._note_bytes += len(rec)
                self.stats["notes"] += 1
            else:
                self.stats["malformed_notes"] += 1
        if was_empty and self._notes:
            self._ready.notify_all()
            try:
                self._sig_w.send(b"x")
            except (BlockingIOError, OSError):
                pass
        if len(state[1]) > MAX_RECORD:
            self.stats["oversized_notes"] += 1
            return False
        return True

    def _retire(self, sock: socket.socket) -> None:
        del self._conns[sock]
        self._unwatched.discard(sock)
        self._dead.append(sock)
        self._server._wake()

    def _register_new(self) -> None:
        """(I/O thread) watch connections accepted by ``drain`` or paused, close finished ones."""
        with self._lock:
            dead, self._dead = self._dead, []
            for sock in dead:
                try:
                    self._server._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()
            if not self._full():
                for sock in self._unwatched:
                    self._server._sel.register(sock, selectors.EVENT_READ, USE_CONN)
                self._unwatched.clear()

    def close(self) -> None:
        with self._lock:
            for sock in [self.listener, *self._conns, *self._dead, self._sig_r, self._sig_w]:
                try:
                    sock.close()
                except OSError:
                    pass
            self._conns.clear()
            self._dead.clear()
            if self._reserve is not None:
                os.close(self._reserve)
                self._reserve = None


def _queued(sock: socket.socket) -> int:
    """Bytes waiting to be read on ``sock`` now (0 if the kernel will not say)."""
    try:
        return int.from_bytes(fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"), "little")
    except OSError:
        return 0


def lease_name(claimed: str, holder: str) -> str:
    """``claimed-process/holder|thread`` from a reader's claimed ``process/thread`` id and its kernel
    holder: what Readers.note_use takes. The thread (at most 32 characters) only names which of the
    process's files are fresh (policy/leases.py); it never makes a holder of its own."""
    process, _, thread = claimed.partition("/")
    return f"{process}/{holder}|{thread[:32]}" if thread else f"{process}/{holder}"


def holder_of(pid: int, uid: int) -> str:
    """The lease holder of a peer: ``uid:pid`` as the kernel reports it. Readers.note_use and the
    per-uid lease cap (policy/leases.py) read the uid back from before the colon."""
    return f"{uid}:{pid}"


def _state(sock: socket.socket) -> list:
    """A new connection's reading state: [reader id, partial record, holder]; before any ``R`` record
    the reader id is the holder's own."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("3i")))
    except OSError:
        pid, uid = 0, -1
    holder = holder_of(pid, uid)
    return [f"/{holder}", bytearray(), holder]
