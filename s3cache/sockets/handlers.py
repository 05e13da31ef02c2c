"""Requests of ctl.sock clients run on a small bounded pool of handler threads, apart from the I/O thread.

A slow request (``verify`` asks S3) stalls neither the I/O thread nor other clients. Invariants: a
connection's requests run one at a time and in order (``Connection._busy``, its inbox), so its answers
leave in request order; after ``MAX_INBOX`` requests a connection yields its thread to others;
``on_close`` runs exactly once per connection, on a handler thread, after its last request; a request
that raises is answered (an S3CacheError with its name as the code, a bug with ``E_FAILED`` and a
traceback in the log), never dropped; at most ``size`` threads run, started on demand.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from s3cache.errors import S3CacheError
from s3cache.reader.wire import E_BUSY, E_FAILED, BadRequest, parse_request

from .connection import MAX_INBOX, Connection

log = logging.getLogger("s3cache.control")  # the socket server's messages, as before the split

HANDLER_THREADS = 8

Handler = Callable[[Connection, dict], "dict | None"]


class Pool:
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



class Requests:
    """Runs connections' requests through ``handle`` on a ``Pool`` (see the module docstring).

    ``stats``: the server's counters (``bad_requests``, ``refused_busy`` are counted here); ``touch(c)``:
    tell the I/O thread that ``c``'s inbox has room or more lines may be waiting."""

    def __init__(self, handle: Handler, on_close: Callable[[Connection], None], stats: dict[str, int],
                 touch: Callable[[Connection], None], size: int = HANDLER_THREADS) -> None:
        self._handle = handle
        self._on_close = on_close
        self.stats = stats
        self._touch = touch
        self._pool = Pool(size, "s3cache-handler")

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def dispatch(self, c: Connection) -> None:
        """Hand ``c``'s queued requests to a handler thread, unless one already runs them."""
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

    def closed(self, c: Connection) -> None:
        """``c`` is closed and no request of it runs: call ``on_close`` on a handler thread."""
        self._pool.submit(self._on_close, c)

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
