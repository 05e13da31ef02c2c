"""SIGTERM, SIGINT and SIGHUP, turned into calls on an ordinary thread.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread is: inside
``Event.set`` or a ``with cond:`` block, say. A handler that itself sets an event or takes a lock can
then deadlock on the lock its own thread holds (``serve`` once hung so after a second SIGTERM arrived
inside the first's ``Event.set``). So the handlers here do nothing at all: the C-level handler writes
the signal's number to a wake-up pipe (``signal.set_wakeup_fd``), and a thread reading that pipe calls
``on_stop`` or ``on_hup``, which may then take any lock.

Invariants: while installed, no Python code of ours runs inside a signal handler; every SIGTERM/SIGINT
reaches ``on_stop`` and every SIGHUP ``on_hup`` (in order; signals of one kind arriving together may
be coalesced by the kernel, which is harmless: both calls are idempotent requests); ``close`` restores
the previous handlers and wake-up fd and ends the thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from .supervise import Supervisor

log = logging.getLogger("s3cache.daemon")

_STOP = (signal.SIGTERM, signal.SIGINT)
_CLOSE = 0  # no signal has number 0: the byte ``close`` writes to end the thread


def _nothing(signum: int, frame: object) -> None:
    """The Python-level handler: the wake-up pipe carries the signal; nothing may happen here."""


class Signals:
    """Install with ``install`` (from the main thread), undo with ``close``."""

    def __init__(self, on_stop: Callable[[], None], on_hup: Callable[[], None], *,
                 supervisor: Supervisor | None = None) -> None:
        """``supervisor``: runs the thread (loop_errors "signals"; a call that raises is counted there)."""
        self._supervisor = supervisor or Supervisor.standalone()
        self._closing = threading.Event()  # set by ``close``: the thread's return is expected
        self._on_stop = on_stop
        self._on_hup = on_hup
        self._old: dict[int, object] = {}
        self._old_fd = -1
        self._r = self._w = -1
        self._thread: threading.Thread | None = None

    def install(self) -> Signals:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._w, False)  # the C handler must never block; a full pipe drops a byte
        self._closing.clear()
        self._thread = self._supervisor.start("s3cache-signals", self._run, stopping=self._closing)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in (*_STOP, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, _nothing)
        return self

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except InterruptedError:
                continue
            for signum in data:
                if signum == _CLOSE:
                    return
                # The pipe must keep being read: a later SIGTERM still has to stop us.
                with self._supervisor.errors.guard("signals", f"handling signal {signum}"):
                    if signum in _STOP:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        self._on_stop()
                    elif signum == signal.SIGHUP:
                        self._on_hup()

    def close(self) -> None:
        if self._thread is None:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        os.set_blocking(self._w, True)
        self._closing.set()
        os.write(self._w, bytes([_CLOSE]))
        self._thread.join()
        os.close(self._r)
        os.close(self._w)
        self._thread = None
