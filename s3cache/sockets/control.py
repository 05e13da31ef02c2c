"""The daemon's side of its two unix sockets under ``.s3cache/`` (the format is in ``wire``).

One I/O thread with a ``selectors`` selector serves both sockets; nothing else reads or writes them, except
``UseChannel.drain`` which reads usage notes in the caller's thread (eviction must see every note sent
before it took the lease lock). Requests run on a small bounded pool of handler threads, one request of a
connection at a time, so a slow request (``verify`` asks S3) stalls neither the I/O thread nor other
clients. Answers and pushed events go to a bounded queue per connection that only the I/O thread writes:
``Connection.send`` never blocks and never touches a socket, so the daemon may call it under its locks, and
a client that stops reading loses only its own connection.

Limits, so that no local client can stall or exhaust the daemon: a line is at most ``wire.MAX_LINE`` (over
it: an error reply and the connection closed), a usage record at most ``wire.MAX_RECORD``, connections are
capped, and when accept() runs out of descriptors (EMFILE/ENFILE) the server backs off and tries again.
One uid (other than root and the daemon's own) may hold at most ``MAX_CONNECTIONS_PER_UID`` of the
connections (more are answered Busy and closed), and a connection that sends no complete request within
``IDLE_TIMEOUT`` seconds of connecting is closed: one group member cannot take every slot (the rules
are admission.py's; this loop applies them).
A crash of the I/O thread is logged with its traceback and the loop restarts; if it keeps crashing the
server is marked ``failed`` and ``on_crash`` is called (by default: the process exits 70, so systemd
restarts it).

Both sockets are mode 0660: readers must share the daemon's group (see the systemd unit).

Here: the selector loop (accepting, reading lines, writing answers, closing) and the server's life.
One client's state and ``send`` are ``connection.Connection``; running requests on handler threads is
``handlers.Requests``. ``Server``, ``Connection`` and ``Client`` are all importable from here.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from s3cache.reader.client import Client, UseNotes  # noqa: F401  (re-exported: the readers' side)
from s3cache.reader.wire import (  # noqa: F401
    E_BUSY,
    E_FAILED,
    E_TOO_LARGE,
    MAX_LINE,
    PROTOCOL,
    BadRequest,
    encode,
    parse_request,
)

from .admission import Admission
from .binding import bind_socket
from .connection import MAX_INBOX, MAX_OUTBOUND, SOFT_OUTBOUND, Connection, _peer  # noqa: F401 (re-exported)
from .handlers import HANDLER_THREADS, Handler, Requests  # noqa: F401  (re-exported)
from .usage_socket import EXHAUSTED, USE_CONN, UseChannel

log = logging.getLogger("s3cache.control")

MAX_CONNECTIONS = 1024  # ctl.sock clients at once; more wait in the listen backlog
MAX_USE_CONNECTIONS = 4096  # use.sock readers at once; more are read and closed
MAX_CONNECTIONS_PER_UID = 128  # ctl.sock clients of one uid (root and the daemon's own uid: no limit)
IDLE_TIMEOUT = 30.0  # seconds a new ctl.sock connection may stay silent before its first request


_WAKE, _CTL, _USE = "wake", "ctl", "use"


class Server:
    """Serves ``ctl.sock`` and ``use.sock`` for the daemon from one I/O thread (see the module docstring).

    ``handle(conn, request)`` runs on a handler thread and returns the answer (or None for none);
    ``on_close(conn)`` runs on a handler thread once per connection, after its last request.
    ``on_crash(exc)`` is called if the I/O thread keeps crashing (``failed`` is set first).
    """

    def __init__(self, ctl_path: str, use_path: str, handle: Handler,
                 on_close: Callable[[Connection], None], *, on_crash: Callable[[BaseException], None] | None = None,
                 max_connections: int = MAX_CONNECTIONS, max_use_connections: int = MAX_USE_CONNECTIONS,
                 max_outbound: int = MAX_OUTBOUND, handler_threads: int = HANDLER_THREADS,
                 max_per_uid: int = MAX_CONNECTIONS_PER_UID, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.ctl_path = ctl_path
        self.use_path = use_path
        self._on_crash = on_crash
        self.max_connections = max_connections
        self.max_outbound = max_outbound
        self.failed = threading.Event()
        self.crash: BaseException | None = None
        self.stats = {"connections": 0, "dropped_slow": 0, "bad_requests": 0, "accept_errors": 0,
                      "crashes": 0, "refused_busy": 0, "refused_uid": 0, "closed_idle": 0}
        self._admission = Admission(max_per_uid, idle_timeout, self.stats)  # I/O thread only
        self._stop = threading.Event()
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()  # guards _dirty and _closing
        self._dirty: set[Connection] = set()
        self._closing: list[Connection] = []
        self._thread: threading.Thread | None = None
        self._requests = Requests(handle, on_close, self.stats, self._touch, handler_threads)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._accept_paused_until: float | None = None
        self._accept_backoff = 0.0
        self._crash_times: deque[float] = deque()
        self.ctl = bind_socket(ctl_path)
        self.ctl.listen(128)
        self.ctl.setblocking(False)
        self.use = UseChannel(bind_socket(use_path), self, max_use_connections)

    # -- life -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._sel.register(self.ctl, selectors.EVENT_READ, _CTL)
        self._sel.register(self.use.listener, selectors.EVENT_READ, _USE)
        self._requests.start()
        self._thread = threading.Thread(target=self._run, name="s3cache-io", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._requests.stop()
        for c in list(self._conns):
            c.closed = True
            self._close_sock(c.sock)
        self._conns.clear()
        self.use.close()
        for s in (self.ctl, self._wake_r, self._wake_w):
            self._close_sock(s)
        self._sel.close()
        for p in (self.ctl_path, self.use_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def counters(self) -> dict[str, int]:
        """For ``status``: connections open, clients dropped for falling behind, malformed requests and
        usage records, accept() failures (descriptors exhausted), I/O thread crashes."""
        return {**self.stats, "connections": len(self._conns), **self.use.stats,
                "use_connections": len(self.use._conns)}

    @staticmethod
    def _close_sock(s: socket.socket) -> None:
        try:
            s.close()
        except OSError:
            pass

    # -- the I/O thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception as e:
                if self._stop.is_set():
                    return
                if self._crashed(e):
                    return

    def _crashed(self, e: BaseException) -> bool:
        """Log a crash of the I/O loop; True when it keeps crashing and the server gives up."""
        self.stats["crashes"] += 1
        log.error("the socket server's I/O loop failed; restarting it", exc_info=e)
        now = time.monotonic()
        self._crash_times.append(now)
        while self._crash_times and now - self._crash_times[0] > 60:
            self._crash_times.popleft()
        if len(self._crash_times) < 10:
            time.sleep(0.1)
            return False
        self.crash = e
        self.failed.set()
        log.critical("the socket server's I/O loop failed %d times in a minute: giving up", len(self._crash_times))
        if self._on_crash is not None:
            self._on_crash(e)
        else:
            os._exit(70)  # never serve on silently without sockets: systemd restarts us
        return True

    def _once(self) -> None:
        timeout = 1.0
        if self._accept_paused_until is not None:
            timeout = max(0.0, min(timeout, self._accept_paused_until - time.monotonic()))
        for key, mask in self._sel.select(timeout):
            what = key.data
            if what is _WAKE:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            elif what is _CTL:
                self._accept()
            elif what is _USE:
                self.use._accept_all(in_io=True)
            elif what is USE_CONN:
                self.use._readable(key.fileobj, in_io=True)
            elif isinstance(what, Connection):
                if mask & selectors.EVENT_WRITE and not what.closed:
                    self._write(what)
                if mask & selectors.EVENT_READ and not what.closed:
                    self._read(what)
        self._housekeep()

    def _housekeep(self) -> None:
        with self._lock:
            closing, self._closing = self._closing, []
            dirty, self._dirty = self._dirty, set()
        for c in closing:
            self._close(c)
        for c in dirty:
            if not c.closed:
                self._requests.dispatch(c)
                self._interest(c)
        self.use._register_new()
        self._close_silent()
        if self._accept_paused_until is not None and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = None
        self._listen(self._accept_paused_until is None and len(self._conns) < self.max_connections)

    def _close_silent(self) -> None:
        """Close connections that sent no request within the idle timeout of connecting (admission.py)."""
        for c in self._admission.idle():
            self.stats["closed_idle"] += 1
            self._close(c)

    def _listen(self, on: bool) -> None:
        registered = self._is_registered(self.ctl)
        if on and not registered:
            self._sel.register(self.ctl, selectors.EVENT_READ, _CTL)
        elif not on and registered:
            self._sel.unregister(self.ctl)

    def _is_registered(self, s: socket.socket) -> bool:
        try:
            self._sel.get_key(s)
            return True
        except KeyError:
            return False

    def _accept(self) -> None:
        while len(self._conns) < self.max_connections:
            try:
                sock, _ = self.ctl.accept()
            except BlockingIOError:
                self._accept_backoff = 0.0
                return
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as e:
                # Out of descriptors (or threads' memory): pause accepting, never stop. Clients wait in
                # the listen backlog and are served as soon as descriptors are free again.
                self.stats["accept_errors"] += 1
                self._accept_backoff = min(1.0, max(0.05, self._accept_backoff * 2))
                self._accept_paused_until = time.monotonic() + self._accept_backoff
                if e.errno not in EXHAUSTED or self.stats["accept_errors"] in (1, 10, 100, 1000, 10000):
                    log.warning("accept() on %s failed (%s); trying again in %.2fs (%d failures so far)",
                                self.ctl_path, os.strerror(e.errno or 0), self._accept_backoff,
                                self.stats["accept_errors"])
                return
            sock.setblocking(False)
            conn = Connection(self, sock)
            if not self._admission.admit(conn):
                self._admission.refuse(sock, conn.uid)
                self._close_sock(sock)
                continue
            self._conns.add(conn)
            self.stats["connections"] += 1
            self._interest(conn)

    def _interest(self, c: Connection) -> None:
        """Watch ``c`` for what it can do now: read while its inbox, input buffer and unread answers are
        small (so each is bounded), write while answers are queued."""
        with c._lock:
            events = 0
            if (len(c._inbox) < MAX_INBOX and len(c._inbuf) < MAX_LINE and c._out_bytes < SOFT_OUTBOUND):
                events |= selectors.EVENT_READ
            if c._out:
                events |= selectors.EVENT_WRITE
        if events == c._events:
            return
        if c._events == 0:
            self._sel.register(c.sock, events, c)
        elif events == 0:
            self._sel.unregister(c.sock)
        else:
            self._sel.modify(c.sock, events, c)
        c._events = events

    def _read(self, c: Connection) -> None:
        try:
            data = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c._inbuf += data
        lines = []
        while True:
            i = c._inbuf.find(b"\n")
            if i < 0:
                break
            lines.append(bytes(c._inbuf[:i]))
            del c._inbuf[: i + 1]
        too_long = any(len(x) >= MAX_LINE for x in lines) or len(c._inbuf) >= MAX_LINE
        if too_long:
            self.stats["bad_requests"] += 1
            c.send({"error": f"request line over {MAX_LINE} bytes: connection closed", "code": E_TOO_LARGE})
            self._write(c)  # the error if the client reads; it is closed either way
            self._close(c)
            return
        if lines:
            self._admission.spoke(c)
            with c._lock:
                c._inbox.extend(lines)
            self._requests.dispatch(c)
        self._interest(c)

    def _write(self, c: Connection) -> None:
        while True:
            with c._lock:
                if not c._out:
                    break
                data = c._out[0]
            try:
                n = c.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(c)
                return
            with c._lock:
                c._out_bytes -= n
                if n == len(data):
                    c._out.popleft()
                else:
                    c._out[0] = data[n:]
        self._interest(c)


    def _touch(self, c: Connection) -> None:
        with self._lock:
            self._dirty.add(c)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the server is stopping)

    def _drop(self, c: Connection, why: str) -> None:
        with c._lock:
            if c.closed:
                return
            c.closed = True
        self.stats["dropped_slow"] += 1
        log.warning("dropped a client of %s that %s", self.ctl_path, why)
        with self._lock:
            self._closing.append(c)
        self._wake()

    def _close(self, c: Connection) -> None:
        """Close ``c`` (I/O thread) and see that on_close runs once, after its last request."""
        with c._lock:
            c.closed = True
            busy = c._busy
            call = not busy and not c._closed_done
            if call:
                c._closed_done = True
            c._out.clear()
            c._out_bytes = 0
        if c._events:
            self._sel.unregister(c.sock)
            c._events = 0
        if c in self._conns:
            self._conns.discard(c)
            self._close_sock(c.sock)
            self._admission.released(c)
        if call:
            self._requests.closed(c)

    # -- handler threads --------------------------------------------------------------------------------
