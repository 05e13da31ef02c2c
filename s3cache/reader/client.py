"""The readers' side of the daemon's two unix sockets (the format is in ``wire``): ``Client`` asks on
``ctl.sock`` and receives pushed events; ``UseNotes`` sends usage notes on ``use.sock``."""

from __future__ import annotations

import json
import socket
import threading
import time

from s3cache.errors import (
    CacheAccessDenied,
    DaemonNotRunning,
    ProtocolError,
    RequestRefused,
)

from .wire import E_TOO_LARGE, MAX_LINE, encode

MAX_REPLY = 8 << 20  # bytes of one line from the daemon (it drops a client 8 MiB behind): past it, not a daemon
BACKLOG_WAIT = 2.0  # seconds a usage note tries again (a full listen backlog, a connection the daemon closed)
STUCK_FOR = 10.0  # after such a wait failed, seconds notes give up at once (a stopped daemon evicts nothing)


class UseNotes:
    """A reader process's connection to ``use.sock``; silently idle when no daemon listens.

    Thread-safe: one lock around each send, so notes of concurrent threads never interleave mid-record."""

    def __init__(self, path: str, reader: str) -> None:
        self.path = path
        self.reader = reader
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._holder: str | None = None  # the lease holder the daemon attributes notes to now
        self._stuck_until = 0.0  # monotonic: until then a full backlog is not waited for

    def _connect(self) -> socket.socket | None:
        """One attempt at a connection to ``use.sock``; None when no daemon listens (nothing can evict
        then either). Raises BlockingIOError when its listen backlog is full: AF_UNIX answers EAGAIN
        there, which is not "no daemon" (``send`` tries again)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(30)
        try:
            s.connect(self.path)  # the first send names the holder (``send``)
            return s
        except BlockingIOError:
            s.close()
            raise
        except OSError:
            s.close()
            return None

    def send(self, kind: str, uris: list[str]) -> None:
        """Tell the daemon these files were used. ``kind``: "h" first look, "w" after waiting.

        A note given up is a lease lost while the daemon evicts, so a full listen backlog (the daemon's
        I/O thread empties it as it goes) and a connection the daemon closed (it restarted, or had too
        many readers and shut reading before this write: usage_socket, then nothing of it was read) are
        tried again on a new connection: at once, then with a backoff for up to BACKLOG_WAIT seconds in
        all. After such a wait failed, not again for STUCK_FOR seconds: a stopped daemon would stall
        every note (and the reader holds the shared lease lock meanwhile)."""
        if not uris:
            return
        notes = b"".join(kind.encode() + u.encode() + b"\0" for u in uris)
        # The daemon holds leases per process as the kernel names it (SO_PEERCRED), whatever id is sent
        # here; "/thread" tells it which thread's newest files to keep fresh (tf.data resolves from
        # many threads, and each opens the file it was given soon after).
        holder = f"{self.reader}/{threading.get_ident()}"
        with self._lock:
            waits = time.monotonic() >= self._stuck_until
            deadline = time.monotonic() + (BACKLOG_WAIT if waits else 0.0)
            pause, retried = 0.001, False
            while True:
                try:
                    if self._sock is None:
                        self._holder = None
                        self._sock = self._connect()
                        if self._sock is None:
                            return  # no daemon: nothing can evict the file either, so no lease is needed
                    # On a new connection the holder and the notes go in one write, so a daemon that
                    # reads a connection and closes it has them all or refuses them all
                    data = notes if holder == self._holder else b"R" + holder.encode() + b"\0" + notes
                    self._sock.sendall(data, socket.MSG_NOSIGNAL)  # EPIPE, never SIGPIPE in an embedder
                    self._holder = holder
                    return
                except OSError:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                if not retried:  # at once the first time: a restarted daemon answers at once
                    retried = True
                    continue
                if time.monotonic() + pause > deadline:
                    if waits:  # a daemon that empties no backlog (stopped, wedged): fail fast a while
                        self._stuck_until = time.monotonic() + STUCK_FOR
                    return
                time.sleep(pause)
                pause = min(pause * 2, 0.1)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _unreachable(cache_dir: str, reason: str) -> DaemonNotRunning:
    """DaemonNotRunning for a daemon that could not be reached for ``reason``: the reason is said apart,
    never pasted into the ``s3cache serve --cache-dir`` command the message suggests."""
    e = DaemonNotRunning(cache_dir)
    e.args = (f"cannot reach the s3cache daemon of {cache_dir}: {reason}. If none runs: {e}",)
    return e


class Client:
    """A reader's connection to the daemon's ``ctl.sock``.

    Lines are buffered here rather than in a file object so that a waiting reader can ``select`` on
    the socket and know that nothing is hidden in a buffer. Pushed events that arrive while a request
    waits for its answer (they may come first) are kept in ``events`` for ``receive``.
    """

    def __init__(self, ctl_path: str, cache_dir: str, timeout: float | None = 60.0) -> None:
        self.ctl_path = ctl_path
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.events: list[dict] = []
        self._buf = b""
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.ctl_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            raise DaemonNotRunning(self.cache_dir) from None
        except PermissionError:
            sock.close()
            raise CacheAccessDenied(self.ctl_path, self.cache_dir) from None
        except BlockingIOError:  # AF_UNIX says EAGAIN, not "wait", when the listen backlog is full
            sock.close()
            raise _unreachable(self.cache_dir, "its control socket's backlog is full: the daemon runs but "
                                               "cannot take more connections now") from None
        except OSError as e:
            sock.close()
            raise _unreachable(self.cache_dir, f"{e.strerror or e} on {self.ctl_path}") from None
        return sock

    def reconnect(self) -> None:
        """A fresh connection (the daemon restarted, or dropped this one for falling behind); events
        already received are kept. Raises DaemonNotRunning if no daemon answers."""
        self.close()
        self._buf = b""
        self.sock = self._connect()

    def request(self, msg: dict, timeout: float | None = None) -> dict:
        """Send ``msg`` and return the answer (pushed events read meanwhile are kept for ``receive``).
        ``timeout``: seconds for this request instead of the connection's. Raises RequestRefused for
        an error answer (a request over the line limit is refused here, before sending),
        DaemonNotRunning if the connection fails or times out."""
        data = encode(msg)
        if len(data) > MAX_LINE:  # the daemon would refuse it and close the connection mid-send
            raise RequestRefused(E_TOO_LARGE, f"a request of {len(data)} bytes, over the control socket's "
                                              f"limit of {MAX_LINE}: send it in pieces")
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            try:
                self.sock.sendall(data)
            except OSError:
                self._raise_refusal()
                raise DaemonNotRunning(self.cache_dir) from None
            while True:
                reply = self._read_line()
                if "event" not in reply:  # events for earlier wants may arrive before the answer
                    return reply
                self.events.append(reply)
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)

    def _raise_refusal(self) -> None:
        """A send failed: if the daemon said why before closing (a refusal), raise that instead of
        calling it gone."""
        try:
            self.sock.settimeout(1.0)
            while True:
                reply = self._read_line()  # raises RequestRefused for an error reply
                if "event" in reply:
                    self.events.append(reply)
        except (DaemonNotRunning, ProtocolError, OSError) as e:
            if isinstance(e, RequestRefused):
                raise
            return

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
            if len(self._buf) > MAX_REPLY and b"\n" not in self._buf:
                self._buf = b""
                raise ProtocolError(f"{self.ctl_path} sent a line over {MAX_REPLY} bytes: not an s3cache daemon")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise ProtocolError(f"the daemon sent a line that is not JSON: {e}") from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"the daemon sent {type(reply).__name__}, not an object")
        if "error" in reply:
            raise RequestRefused(str(reply.get("code", "Unknown")), str(reply["error"]))
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
