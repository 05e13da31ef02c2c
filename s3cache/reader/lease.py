"""The cache's lease lock (``.s3cache/lease.lock``), held shared by readers between finding a file and
telling the daemon they use it, and exclusively by the daemon while it drains those notes and evicts.

``flock`` belongs to the open file description, which every thread of a process shares: a second
``LOCK_EX`` from another thread on the same descriptor succeeds at once, and one thread's ``LOCK_UN``
drops the lock another thread thinks it holds. Both classes here therefore count or serialise their
process's threads around one descriptor.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from s3cache.errors import CacheAccessDenied, ResolveTimeout


class SharedLease:
    """This process's shared hold on the cache's lease lock, counted across threads.

    Invariant: the flock (LOCK_SH) is held exactly while ``_count > 0``; it is taken by the holder that
    moves the count from 0 and released by the one that brings it back to 0, under ``_cond``. At most one
    thread at a time waits for the flock itself (``_taking``); others wait on ``_cond`` for it, each
    within its own deadline.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._count = 0
        self._taking = False
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, deadline: float | None) -> bool:
        """Hold the lock shared; False if there is no lock file (no daemon ever ran: nothing evicts).
        Raises ResolveTimeout naming the lock if ``deadline`` (monotonic) passes first, and
        CacheAccessDenied when this user may not open it (not in the cache dir's group)."""
        with self._cond:
            while True:
                if self._count > 0:
                    self._count += 1
                    return True
                if not self._taking:
                    break
                if not self._cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                    raise self._timeout()
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return False
                except PermissionError:
                    # the lock is 0640 in the cache dir's group, under .s3cache (02750): a user outside
                    # the group meets it first, before any cached file or socket
                    raise CacheAccessDenied(self.path, os.path.dirname(os.path.dirname(self.path))) from None
            self._taking = True
        ok = False
        try:
            self._flock(deadline)
            ok = True
        finally:
            with self._cond:
                self._taking = False
                if ok:
                    self._count += 1
                self._cond.notify_all()
        return True

    def _flock(self, deadline: float | None) -> None:
        assert self._fd is not None
        if deadline is None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            return
        pause = 0.001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timeout() from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)

    def _timeout(self) -> ResolveTimeout:
        return ResolveTimeout(f"timed out waiting for the cache's lease lock {self.path}: another process "
                              f"holds it exclusively (eviction or verify should take milliseconds)")

    def release(self) -> None:
        with self._cond:
            self._count -= 1
            if self._count == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._cond:
            if self._fd is not None:
                os.close(self._fd)  # closing the last descriptor releases any flock with it
                self._fd = None
                self._count = 0


class ExclusiveLease:
    """The daemon's exclusive hold on the lease lock.

    Invariant: at most one thread of the process is inside ``held()``, and while one is, the flock is
    held exclusively (a thread mutex taken before ``LOCK_EX`` and released after ``LOCK_UN``), so no
    reader process is between finding a file and sending its usage note."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._mutex = threading.Lock()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
