"""An HTTP proxy between the daemon and moto's S3 server that counts requests, injects faults, and can
add latency: for the integrity tests and the benchmarks (S3-like conditions on loopback, where the
kernel offers no netem).

It runs an asyncio loop in a background thread. Per request, ``plan(method, path, query)`` returns a
fault name or None:

* ``"503"`` / ``"500"``: answer with an S3 error (SlowDown / InternalError) without asking upstream.
* ``"reset"``: send the headers and half the body, then reset the connection (RST).
* ``"short"``: send the headers and half the body, then close normally: a short body.
* ``"flip"``: flip one byte of the body.
* ``"stall"``: send the headers, then nothing for ``stall_seconds`` (or until ``release`` is set), then
  close.
* ``"ignore-range"``: drop the request's ``Range``, so the whole object comes back with ``200``, as
  servers and proxies that ignore ``Range`` answer.
* ``"shift"``: ask upstream for the requested range moved by one byte (back, or forward from byte 0):
  a ``206`` of the same length whose (true) ``Content-Range`` is not the one asked for.
* ``"no-parts-count"``: drop ``x-amz-mp-parts-count`` from the answer (a HEAD of a part without it).
* ``"range-as-200"``: answer a ranged GET with the range's bytes but as a ``200`` with no
  ``Content-Range``, as a broken cache in the path may: only part of the object, passed off as all of it.
* ``"lie-total"``: a ``206`` whose ``Content-Range`` total says the object ends where the range ends.
* ``"no-checksum-type"``: drop ``x-amz-checksum-type`` from the answer, as servers that predate it do.

``headers_for(method, path, status)``, when given, returns headers to set on an answer (replacing any
of the same name): how a test makes the proxy send a checksum moto does not (SHA-512, XXHASH).

``ranged_checksums=False`` drops ``x-amz-checksum-*`` headers from every answer to a ranged GET, as AWS
does (moto sends them when the range covers the whole object).

``exchanges`` keeps every object request as it reached the proxy, with the answer's status (an
``Exchange``), so a test can see what the client asked (``If-Match``, ``Range``, ``versionId``) and
what came back (a ``412``), and whether it is still in flight (``done``); ``statuses(path)`` counts the answers for one object.

``latency`` delays every response by that many seconds (added before the response is sent), and
``bandwidth`` (bytes/s per connection) paces the body, like one S3 connection; ``link_bandwidth``
(bytes/s shared by all connections) is a saturated link: more connections add no throughput.

Connections in use: a request is *busy* from the moment its head arrives until the last byte of its
answer is written. ``busy()`` is how many are busy now, ``peak_busy`` the most at once, ``timeline``
every change as ``(monotonic time, busy)``, and ``busy_profile(t0, t1)`` the share of ``[t0, t1]``
spent at each count: what shows whether a client keeps its connections working, independent of CPU
load. ``request_bytes`` lists ``(method, path, range, bytes sent, start, end)`` per answered request,
so a test can count the ranges one object was fetched in and how many overlapped.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

Plan = Callable[[str, str, str], "str | None"]

from .faultplans import most_at_once, profile, random_plan  # noqa: E402,F401  (re-exported)
from .heads import drop_header, header_map, misstate_range, set_header, shift_range

_STEP = 64 << 10  # bytes relayed per write: small enough to pace smoothly
FLOW_BIN = 0.1  # seconds per bin of ``FaultProxy.flow``

_ERRORS = {
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
}


@dataclass
class Exchange:
    """One object request as the client sent it, and the status of the answer (0 until it is known;
    the fault's status for an injected error)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    fault: str | None
    status: int = 0
    done: bool = False  # the whole answer was relayed (False while in flight, and for ever if cut off)
    when: float = field(default_factory=time.monotonic)


class FaultProxy:
    def __init__(self, upstream_port: int, plan: Plan | None = None, *, latency: float = 0.0,
                 bandwidth: float = 0.0, link_bandwidth: float = 0.0, stall_seconds: float = 5.0, seed: int = 0,
                 ranged_checksums: bool = True,
                 headers_for: Callable[[str, str, int], dict[str, str]] | None = None) -> None:
        self.upstream_port = upstream_port
        self.headers_for = headers_for
        self.plan = plan or (lambda m, p, q: None)
        self.latency = latency
        self.bandwidth = bandwidth
        self.link_bandwidth = link_bandwidth
        self._link_free_at = 0.0  # when the shared link has sent every chunk booked so far (loop thread only)
        self.stall_seconds = stall_seconds
        self.ranged_checksums = ranged_checksums
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, object path) -> count
        self.faults: Counter[str] = Counter()
        self.exchanges: list[Exchange] = []  # object requests only, in arrival order
        self.bytes_sent = 0
        self.connections = 0  # client connections accepted: few means keep-alive works
        self._busy = 0
        self.peak_busy = 0
        self.timeline: list[tuple[float, int]] = [(time.monotonic(), 0)]  # every change of busy()
        # (method, path, Range, body bytes, start, end): one per answered request, monotonic times
        self.request_bytes: list[tuple[str, str, str, int, float, float]] = []
        self.flow: Counter[tuple[int, int]] = Counter()  # (time bin, request id) -> body bytes sent then
        self._next_id = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self.release = threading.Event()  # ends every stall now (and, once set, makes stalls instant)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- counters ----------------------------------------------------------------------------------

    def gets(self, path_prefix: str = "") -> int:
        """GET requests for objects (not listings) whose path starts with ``path_prefix``."""
        with self.lock:
            return sum(n for (m, p), n in self.requests.items() if m == "GET" and p.startswith(path_prefix))

    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.requests)

    def seen(self, path_prefix: str = "", method: str = "GET") -> list[Exchange]:
        """The object requests (of ``method``) whose path starts with ``path_prefix``, in arrival order."""
        with self.lock:
            return [x for x in self.exchanges if x.method == method and x.path.startswith(path_prefix)]

    def statuses(self, path_prefix: str = "", method: str = "GET") -> Counter[int]:
        """How many answers of each status the requests ``seen(path_prefix, method)`` got."""
        return Counter(x.status for x in self.seen(path_prefix, method))

    def busy(self) -> int:
        """Requests in flight now (head received, answer not yet fully written)."""
        with self.lock:
            return self._busy

    def _set_busy(self, delta: int) -> None:
        with self.lock:
            self._busy += delta
            self.peak_busy = max(self.peak_busy, self._busy)
            self.timeline.append((time.monotonic(), self._busy))

    def reset_peak(self) -> None:
        with self.lock:
            self.peak_busy = self._busy

    def streaming(self, t0: float, t1: float) -> list[int]:
        """For each ``FLOW_BIN`` of ``[t0, t1]``, how many requests sent body bytes in it: busy
        requests whose client stopped reading (a paused download) do not count here."""
        with self.lock:
            keys = list(self.flow)
        per: Counter[int] = Counter(b for b, _ in keys)
        return [per.get(b, 0) for b in range(int(t0 / FLOW_BIN), int(t1 / FLOW_BIN) + 1)]

    def busy_profile(self, t0: float, t1: float) -> dict[int, float]:
        """Seconds of ``[t0, t1]`` (monotonic) spent with each number of busy requests."""
        with self.lock:
            tl = list(self.timeline)
        return profile(tl, t0, t1)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fault proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            async with self._server:
                await self._server.serve_forever()

        try:
            loop.run_until_complete(main())
        except (asyncio.CancelledError, RuntimeError):
            pass
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            def shutdown() -> None:
                self._server.close()
                for task in asyncio.all_tasks(self._loop):
                    task.cancel()
            self._loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- one client connection ---------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r = up_w = None
        busy = False
        with self.lock:
            self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                headers = header_map(head)
                body = b""
                if int(headers.get("content-length", "0")):
                    body = await reader.readexactly(int(headers["content-length"]))
                parts = urlsplit(target)
                path, query = unquote(parts.path), parts.query
                is_object = method in ("GET", "HEAD") and "list-type" not in query and path.count("/") >= 2
                with self.lock:
                    self.requests[(method, path if is_object else path + "?" + query.split("&")[0])] += 1
                started = time.monotonic()
                self._set_busy(+1)
                busy = True
                with self.lock:
                    self._next_id += 1
                    rid = self._next_id
                fault = self.plan(method, path, query) if is_object else None
                exchange = Exchange(method, path, query, headers, fault) if is_object else None
                with self.lock:
                    if fault:
                        self.faults[fault] += 1
                    if exchange is not None:
                        self.exchanges.append(exchange)
                if self.latency:
                    await asyncio.sleep(self.latency)
                if fault in _ERRORS:
                    status, reason, code, msg = _ERRORS[fault]
                    if exchange is not None:
                        exchange.status = status
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{msg}</Message></Error>").encode()
                    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                                 f"Content-Length: {len(xml)}\r\n\r\n".encode() + xml)
                    await writer.drain()
                    if exchange is not None:
                        exchange.done = True
                    busy = False
                    self._set_busy(-1)
                    continue
                ranged = "range" in headers
                if fault == "ignore-range" and ranged:
                    head = drop_header(head, b"range")
                elif fault == "shift" and ranged:
                    head = shift_range(head, headers["range"])
                if up_w is None:
                    up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                up_w.write(head + body)
                await up_w.drain()
                rhead = await up_r.readuntil(b"\r\n\r\n")
                if fault == "no-parts-count":
                    rhead = drop_header(rhead, b"x-amz-mp-parts-count")
                elif fault == "no-checksum-type":
                    rhead = drop_header(rhead, b"x-amz-checksum-type")
                elif fault in ("range-as-200", "lie-total") and rhead.split(b" ", 2)[1] == b"206":
                    rhead = misstate_range(rhead, fault)
                if ranged and not self.ranged_checksums and rhead.split(b" ", 2)[1] == b"206":
                    rhead = drop_header(rhead, b"x-amz-checksum-")
                if self.headers_for is not None:
                    extra = self.headers_for(method, path, int(rhead.split(b" ", 2)[1]))
                    for name, value in (extra or {}).items():
                        rhead = set_header(rhead, name, value)
                rheaders = header_map(rhead)
                if exchange is not None:
                    exchange.status = int(rhead.split(b" ", 2)[1])
                length = int(rheaders.get("content-length", "0")) if method != "HEAD" else 0
                close_upstream = rheaders.get("connection", "").lower() == "close"
                if close_upstream:
                    # moto closes every connection; S3 keeps them alive. Reconnect upstream, and let the
                    # client keep its connection, as it would with S3.
                    rhead = drop_header(rhead, b"connection")
                if fault in ("reset", "short", "stall", "flip") and length >= 2:
                    rbody = await up_r.readexactly(length)
                    if fault == "flip":
                        i = self.rng.randrange(len(rbody))
                        rbody = rbody[:i] + bytes([rbody[i] ^ 0x40]) + rbody[i + 1:]
                    else:
                        writer.write(rhead)
                        if fault == "stall":
                            await writer.drain()
                            until = time.monotonic() + self.stall_seconds
                            while time.monotonic() < until and not self.release.is_set():
                                await asyncio.sleep(0.02)
                        else:
                            writer.write(rbody[: len(rbody) // 2])
                            await writer.drain()
                        if fault == "reset":
                            sock = writer.get_extra_info("socket")
                            if sock is not None:
                                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort() if fault == "reset" else writer.close()
                        return
                    writer.write(rhead)
                    await self._send(writer, rbody, rid)
                else:
                    writer.write(rhead)
                    await self._pipe(up_r, writer, length, rid)
                with self.lock:
                    self.request_bytes.append((method, path, headers.get("range", ""), length, started,
                                               time.monotonic()))
                if exchange is not None:
                    exchange.done = True
                busy = False
                self._set_busy(-1)
                if close_upstream:
                    up_w.close()
                    up_r = up_w = None
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            if busy:
                self._set_busy(-1)
            for w in (writer, up_w):
                if w is not None:
                    try:
                        w.close()
                    except Exception:
                        pass

    async def _pipe(self, src: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int, rid: int = 0) -> None:
        """Relay ``length`` body bytes as they arrive, as S3 streams them: the first byte reaches the
        client before the last leaves the server, and a client that stops reading stops the server
        (backpressure), which is what a client's own scheduling relies on."""
        start, sent = time.monotonic(), 0
        while sent < length:
            chunk = await src.read(min(_STEP, length - sent))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", length - sent)
            sent = await self._paced(writer, chunk, start, sent, rid)

    async def _send(self, writer: asyncio.StreamWriter, body: bytes, rid: int = 0) -> None:
        start, sent = time.monotonic(), 0
        for i in range(0, len(body), _STEP):
            sent = await self._paced(writer, body[i : i + _STEP], start, sent, rid)

    async def _paced(self, writer: asyncio.StreamWriter, chunk: bytes, start: float, sent: int, rid: int = 0) -> int:
        if self.link_bandwidth:
            # Each chunk books the shared link after every chunk booked before it, whichever connection's.
            now = time.monotonic()
            self._link_free_at = max(self._link_free_at, now) + len(chunk) / self.link_bandwidth
            await asyncio.sleep(self._link_free_at - now)
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
        with self.lock:
            self.bytes_sent += len(chunk)
            self.flow[(int(time.monotonic() / FLOW_BIN), rid)] += len(chunk)
        if self.bandwidth:
            # Against the clock since the body began, so time spent writing is not added on top.
            delay = start + sent / self.bandwidth - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return sent


if __name__ == "__main__":
    from s3cache.testing.proxymain import main

    main()
