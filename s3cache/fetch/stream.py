"""Response bodies streamed to disk: the one place bytes from S3 are written into a temp file.

Invariants: a body is written only inside ``[offset, offset + expect_len)`` of its file (a body longer
than its range is a wrong answer, never written); memory stays flat (``CHUNK`` at a time); a short body
raises IncompleteReadError (retried), ENOSPC raises DiskFull; a background stream gives its link slot up
between chunks while a reader's stream waits for one; ``abort`` (stopping) wakes every read blocked on a
body, which then ends as Cancelled.
"""

from __future__ import annotations

import errno
import os
import socket
import threading

import botocore.exceptions

from s3cache.errors import S3CacheError

from .checksum import CHUNK, Digest
from .link import Link, Waited
from .retry import BadResponse, Cancelled


class DiskFull(S3CacheError):
    """The filesystem under the cache dir ran out of space (ENOSPC) during a download."""

    def __init__(self, message: str, size: int = 0) -> None:
        self.size = size
        super().__init__(message)


class Streams:
    """Copies of response bodies in progress: ``copy`` one, ``abort`` them all."""

    def __init__(self, cancel: threading.Event, link: Link, counters) -> None:
        self.cancel = cancel
        self.link = link
        self.counters = counters
        self._bodies: set = set()  # response bodies being read now (``abort`` wakes their reads)
        self._bodies_lock = threading.Lock()

    def abort(self) -> None:
        """Stopping: wake every read blocked on a response body by shutting its socket down, so a stalled
        download does not hold the daemon's shutdown for its read timeout (30 s). Call after setting
        ``cancel``: the failed reads then end as Cancelled, not as retries."""
        with self._bodies_lock:
            bodies = list(self._bodies)
        for body in bodies:
            _shutdown(body)

    def copy(self, body, fd: int, offset: int, expect_len: int, digest: Digest | None,
             waited: Waited | None = None) -> None:
        """Copy a response body to ``fd`` at ``offset`` in chunks; a short body is retried.

        A prefetch stream (``waited`` given and not foreground) gives its link slot up between chunks when
        a reader's stream waits for one (or a reader waits on a saturated link), and streams on once it
        has a slot again; ``waited`` is read per chunk, so a promoted prefetch stops yielding at once.
        """
        got = 0
        with self._bodies_lock:
            self._bodies.add(body)
        try:
            while True:
                if self.cancel.is_set():
                    raise Cancelled("stopping")
                if waited is not None and self.link.should_yield(waited):
                    self.link.pause(waited)
                if got == expect_len:
                    if body.read(1):  # never written: a body longer than its range is a wrong answer
                        raise BadResponse(f"more than the {expect_len} bytes asked for at offset {offset}")
                    break
                chunk = body.read(min(CHUNK, expect_len - got))
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    try:
                        n = os.pwrite(fd, view, offset + got)
                    except OSError as e:
                        if e.errno == errno.ENOSPC:
                            raise DiskFull("no space left on the cache filesystem", os.fstat(fd).st_size) from None
                        raise
                    if digest is not None:
                        digest.update(view[:n])
                    view = view[n:]
                    got += n
                self.counters.add(bytes=len(chunk))
                self.link.moved(len(chunk))
        except BaseException:
            # A body abandoned half-read must be closed: its connection cannot be reused. A body read to
            # the end has already handed its connection back to the pool, which is what keeps small
            # objects from paying a TCP (and TLS) handshake each.
            body.close()
            if self.cancel.is_set():
                raise Cancelled("stopping") from None  # a read that abort() woke
            raise
        finally:
            with self._bodies_lock:
                self._bodies.discard(body)
        if got != expect_len:
            body.close()
            raise botocore.exceptions.IncompleteReadError(actual_bytes=got, expected_bytes=expect_len)


def _shutdown(body) -> None:
    """Shut down the socket under a botocore/urllib3 response body (from another thread: a blocked recv
    returns at once, which closing the descriptor alone does not guarantee)."""
    raw = getattr(body, "_raw_stream", body)
    conn = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    sock = getattr(conn, "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        else:
            raw.close()
    except (OSError, AttributeError):
        pass
