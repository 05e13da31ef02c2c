"""Loops that outlive their errors, and threads that never die silently.

Every long-running loop of the daemon runs under ``supervised``: an exception that escapes one
iteration is counted (by loop name, shown in status as ``loop_errors``), logged once with its
traceback, and the loop starts again after a short backoff. A loop that returns while the daemon is
not stopping, or a BaseException that is not an Exception, is a dead thread: ``on_death`` is told, and
the daemon logs it and exits non-zero so that systemd restarts it.

Logging once: the same failure (loop, exception type and message) repeating every second must not
write a traceback every second. The first occurrence is logged with its traceback; repeats are counted
and summarised at most once per ``REPEAT_LOG`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from s3cache.manifest.refs import printable
from s3cache.service.config import redact_urls

log = logging.getLogger("s3cache.daemon")

REPEAT_LOG = 60.0  # seconds between summaries of one repeating failure
BACKOFF = (0.1, 10.0)  # a loop that raised restarts after this, doubling up to the maximum
HEALTHY = 60.0  # a run this long without an exception starts the backoff over from its minimum


class LoopErrors:
    """Exceptions survived, by loop.

    Invariant: ``counts[loop]`` is the number of exceptions ``record`` was given for ``loop``; each
    distinct failure was logged with a traceback exactly once, and its repeats at most once per
    ``REPEAT_LOG`` seconds. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.counts: dict[str, int] = {}
        self._seen: dict[tuple[str, str], list] = {}  # key -> [last summary time, repeats since]

    def record(self, loop: str, exc: BaseException, context: str = "") -> None:
        what = printable(redact_urls(f"{type(exc).__name__}: {exc}"))
        where = f"{loop}: {context}" if context else loop
        now = self._clock()
        with self._lock:
            seen = self._seen.get((where, what))
            if seen is None:
                if len(self._seen) > 1000:  # distinct failures are few; bound it anyway
                    self._seen.clear()
                self._seen[(where, what)] = [now, 0]
                first, repeats = True, 0
            else:
                seen[1] += 1
                first = False
                repeats = seen[1] if now - seen[0] >= REPEAT_LOG else 0
                if repeats:
                    seen[0], seen[1] = now, 0
        if first:
            log.error("%s failed, carrying on: %s", where, what, exc_info=exc)
        elif repeats:
            log.error("%s failed again %d time(s) in the last %.0f s: %s", where, repeats, REPEAT_LOG, what)
        # Counted once logged: whoever sees the count in status finds its line in the log already.
        with self._lock:
            self.counts[loop] = self.counts.get(loop, 0) + 1

    @contextmanager
    def guard(self, loop: str, context: str = "") -> Iterator[None]:
        """One step of a loop: an exception in it is recorded and swallowed."""
        try:
            yield
        except Exception as e:
            self.record(loop, e, context)

    def status(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def supervised(name: str, body: Callable[[], object], errors: LoopErrors, stopping: threading.Event,
               on_death: Callable[[str, str], None],
               clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """A thread target running ``body`` (a loop) until the daemon stops.

    ``body`` raising an Exception: recorded under ``name``, and ``body`` runs again after a backoff
    (the loop resumes with its next iteration; a loop keeps its state in its object, not its frame).
    The backoff doubles from ``BACKOFF[0]`` up to ``BACKOFF[1]`` while the failures come close together,
    and starts over once a run lasted ``HEALTHY`` seconds (``clock``'s), so that a loop that failed a
    few times long ago restarts at once after its next failure instead of waiting the maximum.
    ``body`` returning while ``stopping`` is not set, or raising a BaseException: ``on_death(name,
    why)``, and the thread ends.
    """

    def run() -> None:
        delay = BACKOFF[0]
        while True:
            began = clock()
            try:
                body()
            except Exception as e:
                errors.record(name, e)
                if clock() - began >= HEALTHY:
                    delay = BACKOFF[0]
                if stopping.wait(delay):
                    return
                delay = min(delay * 2, BACKOFF[1])
                continue
            except BaseException as e:
                on_death(name, f"{type(e).__name__}: {e}")
                raise
            if not stopping.is_set():
                on_death(name, "its loop ended")
            return

    return run


class Supervisor:
    """Starts threads whose targets run under ``supervised``, all counted in one ``LoopErrors`` and
    reporting a death to one ``on_death``. The daemon owns one (root.py) and hands it to every part
    that runs a loop of its own (the verifier, the signals thread, the starting keep-alive, the peer
    listener), so that no loop of the daemon can fail unseen.

    ``standalone()``: one of its own, for a part used outside a daemon (a test, a tool), whose deaths are
    only logged."""

    def __init__(self, errors: LoopErrors, stopping: threading.Event,
                 on_death: Callable[[str, str], None]) -> None:
        self.errors = errors
        self.stopping = stopping
        self.on_death = on_death

    @classmethod
    def standalone(cls) -> Supervisor:
        def died(loop: str, why: str) -> None:
            log.critical("the %s thread died (%s)", loop, why)
        return cls(LoopErrors(), threading.Event(), died)

    def start(self, name: str, body: Callable[[], object], *, loop: str | None = None,
              stopping: threading.Event | None = None) -> threading.Thread:
        """Start a daemon thread ``name`` running ``body`` under ``supervised``; ``loop`` is its name in
        ``loop_errors`` (default: ``name`` without ``s3cache-``), ``stopping`` the event whose being set
        makes ``body`` returning normal (default: the daemon's)."""
        loop = loop or name.removeprefix("s3cache-")
        target = supervised(loop, body, self.errors, stopping or self.stopping, self.on_death)
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        return t
