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
A crash of the I/O thread is logged with its traceback and the loop restarts; if it keeps crashing the
server is marked ``failed`` and ``on_crash`` is called (by default: the process exits 70, so systemd
restarts it).

Both sockets are mode 0660: readers must share the daemon's group (see the systemd unit).
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from .client import Client, UseNotes  # noqa: F401  (re-exported: the readers' side)
from .errors import S3CacheError
from .usage_socket import EXHAUSTED, USE_CONN, UseChannel
from .wire import (E_BUSY, E_FAILED, E_TOO_LARGE, MAX_LINE, PROTOCOL, BadRequest, encode,  # noqa: F401
                   parse_request)

log = logging.getLogger("s3cache.control")

MAX_CONNECTIONS = 1024  # ctl.sock clients at once; more wait in the listen backlog
MAX_USE_CONNECTIONS = 4096  # use.sock readers at once; more are read and closed
MAX_OUTBOUND = 8 << 20  # bytes queued for one client before it is dropped as fallen behind
SOFT_OUTBOUND = 256 << 10  # past this, stop reading that client's requests until it reads its answers
MAX_INBOX = 4  # complete request lines buffered per connection before reading pauses
HANDLER_THREADS = 8

Handler = Callable[["Connection", dict], "dict | None"]


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


class _Pool:
    """Up to ``size`` threads running queued calls; threads start on demand and never die (a call that
    raises is logged). One thread is started by ``start``, so there is always at least one."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._spawn_failed = False

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
        t.start()
        self._threads.append(t)

    def submit(self, fn: Callable, *args) -> None:
        self._q.put((fn, args))
        with self._lock:
            if self._q.qsize() > self._idle and len(self._threads) < self._size:
                try:
                    self._spawn()
                except RuntimeError as e:  # no thread to be had now: the running ones get to it
                    if not self._spawn_failed:
                        log.warning("cannot start another %s thread (%s); serving with %d",
                                    self._name, e, len(self._threads))
                    self._spawn_failed = True

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._q.get()
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("unexpected error in %s", self._name)

    def stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=5)


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
                 max_outbound: int = MAX_OUTBOUND, handler_threads: int = HANDLER_THREADS) -> None:
        self.ctl_path = ctl_path
        self.use_path = use_path
        self._handle = handle
        self._on_close = on_close
        self._on_crash = on_crash
        self.max_connections = max_connections
        self.max_outbound = max_outbound
        self.failed = threading.Event()
        self.crash: BaseException | None = None
        self.stats = {"connections": 0, "dropped_slow": 0, "bad_requests": 0, "accept_errors": 0,
                      "crashes": 0, "refused_busy": 0}
        self._stop = threading.Event()
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()  # guards _dirty and _closing
        self._dirty: set[Connection] = set()
        self._closing: list[Connection] = []
        self._thread: threading.Thread | None = None
        self._pool = _Pool(handler_threads, "s3cache-handler")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._accept_paused_until: float | None = None
        self._accept_backoff = 0.0
        self._crash_times: deque[float] = deque()
        self.ctl = self._bind(ctl_path)
        self.ctl.listen(128)
        self.ctl.setblocking(False)
        self.use = UseChannel(self._bind(use_path), self, max_use_connections)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        try:
            os.unlink(path)  # a socket left by a killed daemon; we hold the cache lock, so it is stale
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        return s

    # -- life -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._sel.register(self.ctl, selectors.EVENT_READ, _CTL)
        self._sel.register(self.use.listener, selectors.EVENT_READ, _USE)
        self._pool.start()
        self._thread = threading.Thread(target=self._run, name="s3cache-io", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.stop()
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
                self._dispatch(c)
                self._interest(c)
        self.use._register_new()
        if self._accept_paused_until is not None and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = None
        self._listen(self._accept_paused_until is None and len(self._conns) < self.max_connections)

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
            with c._lock:
                c._inbox.extend(lines)
            self._dispatch(c)
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

    def _dispatch(self, c: Connection) -> None:
        with c._lock:
            if c._busy or not c._inbox or c.closed:
                return
            c._busy = True
        try:
            self._pool.submit(self._serve, c)
        except Exception:  # the queue itself failed: answer rather than drop the request
            with c._lock:
                c._busy = False
                c._inbox.clear()
            self.stats["refused_busy"] += 1
            c.send({"error": "the daemon cannot take requests now", "code": E_BUSY})

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
        if call:
            self._pool.submit(self._on_close, c)

    # -- handler threads --------------------------------------------------------------------------------

    def _serve(self, c: Connection) -> None:
        """Run ``c``'s queued requests in order; after a few, yield the thread to other connections."""
        for _ in range(MAX_INBOX):
            with c._lock:
                if c.closed or not c._inbox:
                    break
                line = c._inbox.popleft()
            self._touch(c)  # the inbox has room: reading may resume
            reply = self._answer(c, line)
            if reply is not None:
                c.send(reply)
        with c._lock:
            c._busy = False
            call = c.closed and not c._closed_done
            if call:
                c._closed_done = True
        if call:
            self._on_close(c)
        else:
            self._touch(c)  # more lines may be waiting: the I/O thread dispatches them

    def _answer(self, c: Connection, line: bytes) -> dict | None:
        try:
            msg = parse_request(line)
        except BadRequest as e:
            self.stats["bad_requests"] += 1
            return {"error": f"bad request: {e}", "code": e.code}
        try:
            return self._handle(c, msg)
        except S3CacheError as e:  # bad input the daemon named: an answer, not a bug
            return {"error": str(e), "code": type(e).__name__}
        except Exception as e:  # a bug in the daemon: say so in the log, answer, keep serving
            log.error("request %r failed", msg.get("op"), exc_info=e)
            return {"error": f"{type(e).__name__}: {e}", "code": E_FAILED}
