"""The daemon's two unix sockets under ``.s3cache/`` and their wire format.

``ctl.sock`` (stream, one JSON object per line) carries requests that need an answer::

    {"op": "want", "uris": [...], "reader": "..."}   ->  {"results": [{"uri", "state", ...}, ...]}
    {"op": "status"}                                  ->  {"status": {...}}
    {"op": "hello"}                                   ->  {"ok": true, "pid": ...}

After a ``want``, the daemon pushes ``{"event": "ready" | "failed", "uri": ...}`` on the same connection
for every URI it answered ``pending``; a reader that loses the connection knows the daemon is gone.

``use.sock`` (stream) carries fire-and-forget usage notes from readers' fast path over one connection per
reader process: NUL-terminated records, ``R<reader id>`` once, then ``h<uri>`` (found on the first look,
a cache hit) or ``w<uri>`` (found after waiting). Keys never contain NUL. A note costs a reader one
``send``; a stream (unlike datagrams, capped at 10 queued by Linux's default ``max_dgram_qlen``) absorbs
bursts in its socket buffer and pushes back, rather than dropping, when the daemon falls behind.

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
        self.use = UseChannel(self._bind(socket.SOCK_STREAM, use_path))

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
        self.use.close()
        try:
            self.ctl.close()
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


class UseChannel:
    """The daemon's side of ``use.sock``: every reader connection, read without blocking.

    The caller serialises ``drain`` (the daemon holds its state lock), so a note read is a note applied:
    eviction can drain too and know it has seen every note sent before it took the lease lock.
    """

    def __init__(self, listener: socket.socket) -> None:
        listener.listen(512)
        listener.setblocking(False)
        self.listener = listener
        self._conns: dict[socket.socket, list] = {}  # sock -> [reader id, partial bytes]

    def fds(self) -> list[socket.socket]:
        return [self.listener, *self._conns]

    def drain(self) -> list[tuple[str, str, str]]:
        """(reader, kind, uri) for every complete note waiting, accepting new readers first."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                break
            sock.setblocking(False)
            self._conns[sock] = ["", b""]
        out: list[tuple[str, str, str]] = []
        for sock, state in list(self._conns.items()):
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    sock.close()
                    del self._conns[sock]
                    break
                records = (state[1] + data).split(b"\0")
                state[1] = records.pop()
                for rec in records:
                    kind, text = rec[:1].decode(), rec[1:].decode("utf-8", "replace")
                    if kind == "R":
                        state[0] = text
                    elif kind in ("h", "w"):
                        out.append((state[0], kind, text))
        return out

    def close(self) -> None:
        for sock in [self.listener, *self._conns]:
            try:
                sock.close()
            except OSError:
                pass
        self._conns.clear()


# -- client side ------------------------------------------------------------------------------------


class UseNotes:
    """A reader process's connection to ``use.sock``; silently idle when no daemon listens."""

    def __init__(self, path: str, reader: str) -> None:
        self.path = path
        self.reader = reader
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(30)
        try:
            s.connect(self.path)
            s.sendall(b"R" + self.reader.encode() + b"\0")
        except OSError:
            s.close()
            return None
        return s

    def send(self, kind: str, uris: list[str]) -> None:
        """Tell the daemon these files were used. ``kind``: "h" first look, "w" after waiting."""
        if not uris:
            return
        data = b"".join(kind.encode() + u.encode() + b"\0" for u in uris)
        for _ in range(2):  # once more on a fresh connection if the daemon restarted since the last note
            if self._sock is None:
                self._sock = self._connect()
                if self._sock is None:
                    return  # no daemon: nothing can evict the file either, so no lease is needed
            try:
                self._sock.sendall(data)
                return
            except OSError:
                self._sock.close()
                self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None




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
