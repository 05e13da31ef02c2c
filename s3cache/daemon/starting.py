"""The daemon while it starts: what the control socket answers before the parts exist, and systemd's
start timeout kept from killing a slow start.

The control and usage sockets open as soon as the cache dir is taken, before the manifest is read, its
prefix lines listed and the cache reconciled (minutes on a big cache or a slow S3). Until the daemon
serves, ``Starting.answer`` replies to each request:

* ``status``: ``{"state": "starting", "step", "seconds" (in this step), "progress", "waiting" (reader
  connections waiting), ...}``; the
  metrics read the same dict (``s3cache_starting`` 1);
* ``want``: each URI ``"starting"``: the reader keeps waiting (up to its own timeout) and is told
  ``{"event": "started"}`` the moment the daemon serves, so it asks again at once;
* ``explain``: why the file is not there yet (the step);
* ``hello``: ``ok`` false with the step: "not serving yet", without claiming there is no daemon;
* anything else: a ``Starting`` error naming the step (verify, pin and announcing an order wait for
  the daemon to serve; a reader's order announcement is simply not taken).

Under systemd (``Type=notify``) a thread sends ``EXTEND_TIMEOUT_USEC`` every ``EXTEND_EVERY`` seconds
while starting, each granting ``EXTEND_BY`` more, so ``TimeoutStartSec`` never kills a slow reconcile
or listing. The messages come from a thread of their own, so a step that hangs is extended too: status
shows the step and how long it has run, for an operator (or a startupProbe) to judge.

Threads: ``answer`` runs on the control server's handler threads, ``step``/``listed`` on the starting
thread; the little state they share is under ``_lock`` (a leaf lock).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from s3cache.service import notify
from s3cache.sockets.control import PROTOCOL, Connection

from .supervise import Supervisor

EXTEND_EVERY = 10.0  # seconds between EXTEND_TIMEOUT_USEC messages while starting
EXTEND_BY = 30.0  # seconds each one grants (several intervals: a late message must not be fatal)


class Starting:
    """The start-up's current step and progress, and the answers given meanwhile (see module doc)."""

    def __init__(self, cache_dir: str, manifest: str | None, *, supervisor: Supervisor | None = None) -> None:
        self._supervisor = supervisor or Supervisor.standalone()  # runs the keep-alive (loop_errors "starting")
        self._cache_dir = cache_dir
        self._manifest = manifest
        self._lock = threading.Lock()
        self._step = "taking the cache dir"
        self._since = time.monotonic()
        self._started_at = time.time()
        self._progress = ""
        self._listed = [0, 0]  # prefix lines listed, objects they gave
        self._waiting: list[Connection] = []  # readers told "starting", told "started" at the end
        self._done = threading.Event()
        self._keepalive: threading.Thread | None = None

    def step(self, text: str) -> None:
        """Start-up moved on to ``text`` (also systemd's STATUS=)."""
        notify.status(text)
        with self._lock:
            self._step, self._since, self._progress = text, time.monotonic(), ""

    def listed(self, objects: int) -> None:
        """A prefix line of the manifest was listed (``objects`` objects): reading it is progressing."""
        with self._lock:
            self._listed[0] += 1
            self._listed[1] += objects
            self._progress = f"{self._listed[0]} prefix line(s) listed, {self._listed[1]} object(s)"

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"state": "starting", "step": self._step, "seconds": round(time.monotonic() - self._since, 1),
                    "progress": self._progress, "cache_dir": self._cache_dir, "pid": os.getpid(),
                    "uptime": round(time.time() - self._started_at, 1), "manifest": self._manifest,
                    "waiting": len(self._waiting)}

    def _line(self) -> str:
        st = self.status()
        progress = f"; {st['progress']}" if st["progress"] else ""
        return f"the daemon is starting: {st['step']} ({st['seconds']:.0f}s so far{progress})"

    def answer(self, conn: Connection, msg: dict) -> dict:
        """The control socket's reply to ``msg`` while starting."""
        op = msg.get("op")
        if op == "status":
            return {"status": self.status()}
        if op == "hello":
            return {"ok": False, "starting": self.status(), "pid": os.getpid(), "protocol": PROTOCOL}
        uris = [str(u) for u in msg.get("uris", [])] if isinstance(msg.get("uris"), list) else []
        if op == "want":
            with self._lock:
                if conn not in self._waiting:
                    self._waiting.append(conn)
            return {"results": [{"uri": u, "state": "starting", "message": self._line()} for u in uris]}
        if op == "explain":
            return {"results": [{"uri": u, "state": "starting", "text": self._line()} for u in uris[:64]]}
        return {"error": f"{self._line()}; try again once it serves", "code": "Starting"}

    # == the end of start-up ==========================================================================

    def keep_alive(self) -> None:
        """Send EXTEND_TIMEOUT_USEC until ``finish`` (only under systemd: without $NOTIFY_SOCKET, no thread)."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        def run() -> None:
            while True:
                notify.extend_timeout(EXTEND_BY)
                if self._done.wait(EXTEND_EVERY):
                    return
        self._keepalive = self._supervisor.start("s3cache-starting", run, stopping=self._done)

    def finish(self) -> None:
        """Start-up ended (served, or failed): stop the keep-alives; tell readers who asked meanwhile."""
        self._done.set()
        if self._keepalive is not None:
            self._keepalive.join(timeout=10)
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for conn in waiting:
            conn.send({"event": "started"})
