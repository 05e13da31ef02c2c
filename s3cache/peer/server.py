"""The HTTP listener that serves this host's published, verified files to its peers.

One request form, ``GET /v1/object?uri=<s3 uri>&wait=<seconds>``, signed (``signing``); anything
else is refused. The file is found by ``find(uri, wait)`` — the daemon's index, by the object's URI,
among the objects of its manifest — never through a path built from the request, opened with
``O_NOFOLLOW`` and sent with ``sendfile`` (paced to ``rate`` bytes/s when set). An object this host
owns but has not fetched yet is fetched by ``find`` (once, however many peers ask) while the request
waits up to ``wait`` seconds (at most ``MAX_WAIT``).

Bounds, so that a neighbour cannot exhaust the host: at most ``max_connections`` connections at once
(one more is closed at once), ``idle`` seconds without a byte from the peer closes its connection,
one request line and ``MAX_HEADERS`` headers of http.server's limits.

Answers: 200 with the bytes; 400 malformed, 403 not signed right, 404 not here (outside the manifest, not
fetched in time, or not a known object), 405 not GET.
"""

from __future__ import annotations

import http.server
import logging
import math
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from . import signing
from .client import PATH

log = logging.getLogger("s3cache.peer")

MAX_WAIT = 120.0
PACE_STEP = 256 << 10  # bytes sent between two looks at the clock when paced


class Found(NamedTuple):
    """A published file: where it is (absolute, from the index)."""

    path: str


Find = Callable[[str, float], "Found | None"]
Spawn = Callable[..., threading.Thread]  # (target, name, *, stopping) -> a started, supervised thread


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects = 0
        self.bytes = 0
        self.refused: dict[str, int] = {}
        self.connections = 0
        self.peak = 0

    def refuse(self, why: str) -> None:
        with self.lock:
            self.refused[why] = self.refused.get(why, 0) + 1


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Http
    protocol_version = "HTTP/1.1"
    server_version = "s3cache-peer"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.owner.idle  # StreamRequestHandler sets it on the socket
        super().setup()

    def log_message(self, format: str, *args) -> None:
        log.debug("peer %s: %s", self.client_address[0], format % args)

    def _refuse(self, code: int, why: str) -> None:
        self.server.owner.counts.refuse(why)
        self.send_response(code, why)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        owner = self.server.owner
        problem = signing.check(owner.secret, "GET", self.path, self.headers, time.time())
        if problem is not None:
            return self._refuse(403, problem)
        parts = urlsplit(self.path)
        try:
            query = parse_qs(parts.query, max_num_fields=4)
        except ValueError:
            return self._refuse(400, "not an object request")
        uris, waits = query.get("uri", []), query.get("wait", ["0"])
        if parts.path != PATH or len(uris) != 1 or len(waits) != 1:
            return self._refuse(400, "not an object request")
        try:
            wait = float(waits[0])
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait):
            return self._refuse(400, "bad wait")
        wait = min(max(wait, 0.0), MAX_WAIT)
        found = owner.find(uris[0], wait)
        if found is None:
            return self._refuse(404, "not here")
        try:
            fd = os.open(found.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # evicted between the lookup and the open
            return self._refuse(404, "not here")
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.flush()
            sent = owner.send(self.connection, f, size)
        with owner.counts.lock:
            owner.counts.objects += 1
            owner.counts.bytes += sent

    def do_PUT(self) -> None:
        self._refuse(405, "read only")

    do_POST = do_DELETE = do_HEAD = do_PATCH = do_PUT


class _Http(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog: peers connecting before ``start`` wait in it
    allow_reuse_address = True
    owner: PeerServer

    def process_request(self, request, client_address) -> None:
        counts = self.owner.counts
        with counts.lock:
            full = counts.connections >= self.owner.max_connections
            if not full:
                counts.connections += 1
                counts.peak = max(counts.peak, counts.connections)
        if full:
            counts.refuse("too many connections")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.owner.counts.lock:
                self.owner.counts.connections -= 1

    def handle_error(self, request, client_address) -> None:
        log.debug("peer connection from %s ended with an error", client_address[0], exc_info=True)


class _Http6(_Http):
    address_family = socket.AF_INET6  # socketserver binds IPv4 unless told; "::1" is not an IPv4 host


class PeerServer:
    """Serves ``find``'s files on ``addr`` (HOST:PORT) to requests signed with ``secret``."""

    def __init__(self, addr: str, secret: bytes, find: Find, *, max_connections: int = 64, idle: float = 10.0,
                 rate: int = 0) -> None:
        host, _, port = addr.rpartition(":")
        self.secret = secret
        self.find = find
        self.max_connections = max_connections
        self.idle = idle
        self.rate = rate
        self.counts = _Counts()
        v6 = host.startswith("[")  # HOST:PORT as config.peer_address writes it
        self._http = (_Http6 if v6 else _Http)((host.strip("[]"), int(port)), _Handler, bind_and_activate=True)
        self._http.owner = self
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return self._http.server_address[:2]

    def start(self, spawn: Spawn | None = None) -> None:
        """Serve on a thread of its own. ``spawn(target, name, stopping=event) -> Thread``: the daemon's
        supervised start (an exception escaping ``serve_forever`` is counted in loop_errors and it serves
        again); without one, a plain thread."""
        self._stopped.clear()
        if spawn is None:
            self._thread = threading.Thread(target=self._serve, name="s3cache-peer-server", daemon=True)
            self._thread.start()
        else:
            self._thread = spawn(self._serve, "s3cache-peer-server", stopping=self._stopped)

    def _serve(self) -> None:
        self._http.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        if self._thread is not None:
            self._stopped.set()  # before shutdown: serve_forever returning is then expected
            self._http.shutdown()
            self._thread.join(timeout=10)
        self._http.server_close()

    def send(self, sock: socket.socket, f, size: int) -> int:
        """``size`` bytes of ``f`` to ``sock`` with sendfile, paced to ``rate`` bytes/s when set."""
        if not self.rate:
            return sock.sendfile(f, 0, size)
        sent, start = 0, time.monotonic()
        step = max(1024, min(PACE_STEP, self.rate // 10))  # a slow pace sends often: never idle for long
        while sent < size:
            n = sock.sendfile(f, sent, min(step, size - sent))
            if not n:
                break
            sent += n
            ahead = sent / self.rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        return sent

    def status(self) -> dict:
        c = self.counts
        with c.lock:
            return {"served": {"objects": c.objects, "bytes": c.bytes}, "refused": dict(c.refused),
                    "connections": c.connections, "peak_connections": c.peak}
