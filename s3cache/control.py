"""The daemon's two unix sockets under ``.s3cache/`` and their wire format.

``ctl.sock`` (stream, one JSON object per line) carries requests that need an answer::

    {"op": "want", "uris": [...], "reader": "..."}   ->  {"results": [{"uri", "state", ...}, ...]}
    {"op": "status"}                                  ->  {"status": {...}}
    {"op": "use" | "pin" | "unpin" | "verify", ...}   ->  {"ok": true, ...}

After a ``want``, the daemon pushes ``{"event": "ready" | "failed", "uri": ...}`` on the same connection
for every URI it answered ``pending``; a reader that loses the connection knows the daemon is gone.

``use.sock`` (datagrams) carries fire-and-forget usage notes from readers' fast path: the reader id on
the first line, one URI per following line. Sending one costs a reader a single syscall.

Both sockets are mode 0660: readers must share the daemon's group (see the systemd unit).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable

from .errors import DaemonNotRunning, ProtocolError

PROTOCOL = 1
MAX_DATAGRAM = 60_000


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class Connection:
    """One client connection on the daemon side; ``send`` is safe from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self.closed = False

    def send(self, msg: dict) -> bool:
        data = encode(msg)
        with self._wlock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False


Handler = Callable[[Connection, dict], dict]


class Server:
    """Serves ``ctl.sock`` (one thread per connection) and ``use.sock`` for the daemon."""

    def __init__(self, ctl_path: str, use_path: str, handle: Handler,
                 on_close: Callable[[Connection], None]) -> None:
        self.ctl_path = ctl_path
        self.use_path = use_path
        self._handle = handle
        self._on_close = on_close
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self.ctl = self._bind(socket.SOCK_STREAM, ctl_path)
        self.ctl.listen(128)
        self.use = self._bind(socket.SOCK_DGRAM, use_path)
        self.use.setblocking(False)
        # A deep receive buffer lets a burst of readers' notes wait for the daemon instead of failing.
        self.use.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    @staticmethod
    def _bind(kind: int, path: str) -> socket.socket:
        try:
            os.unlink(path)  # a socket left by a killed daemon; we hold the cache lock, so it is stale
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        return s

    def start(self) -> None:
        t = threading.Thread(target=self._accept_loop, name="s3cache-ctl", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        self.ctl.settimeout(0.5)
        while not self._stop.is_set():
            try:
                sock, _ = self.ctl.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            conn = Connection(sock)
            with self._conns_lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="s3cache-conn", daemon=True)
            t.start()

    def _serve(self, conn: Connection) -> None:
        f = conn.sock.makefile("rb")
        try:
            for line in f:
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except ValueError as e:
                    conn.send({"error": f"bad request: {e}"})
                    continue
                try:
                    reply = self._handle(conn, msg)
                except Exception as e:  # one bad request must not take the daemon down
                    reply = {"error": f"{type(e).__name__}: {e}"}
                if reply is not None and not conn.send(reply):
                    break
        except OSError:
            pass
        finally:
            conn.closed = True
            with self._conns_lock:
                self._conns.discard(conn)
            self._on_close(conn)
            try:
                conn.sock.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        for s in (self.ctl, self.use):
            try:
                s.close()
            except OSError:
                pass
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for p in (self.ctl_path, self.use_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        for t in self._threads:
            t.join(timeout=5)


# -- client side ------------------------------------------------------------------------------------


class Client:
    """A reader's connection to the daemon's ``ctl.sock``.

    Lines are buffered here rather than in a file object so that a waiting reader can ``select`` on
    the socket and know that nothing is hidden in a buffer.
    """

    def __init__(self, ctl_path: str, cache_dir: str, timeout: float | None = 60.0) -> None:
        self.cache_dir = cache_dir
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(ctl_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            self.sock.close()
            raise DaemonNotRunning(cache_dir) from None
        except PermissionError:
            self.sock.close()
            raise DaemonNotRunning(
                f"{cache_dir} (permission denied on {ctl_path}: join the daemon's group)") from None
        self._buf = b""
        self.events: list[dict] = []  # pushed events that arrived while waiting for an answer

    def request(self, msg: dict) -> dict:
        try:
            self.sock.sendall(encode(msg))
        except OSError:
            raise DaemonNotRunning(self.cache_dir) from None
        while True:
            reply = self._read_line()
            if "event" not in reply:  # events for earlier wants may arrive before the answer
                return reply
            self.events.append(reply)

    def buffered(self) -> bool:
        return b"\n" in self._buf or bool(self.events)

    def receive(self) -> dict:
        """The next message; raises DaemonNotRunning when the daemon closes the connection."""
        if self.events:
            return self.events.pop(0)
        return self._read_line()

    def _read_line(self) -> dict:
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                raise DaemonNotRunning(self.cache_dir)
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise ProtocolError(f"daemon refused the request: {reply['error']}")
        return reply

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
