"""The seam the workers fetch through when peers are configured: the owner first, then S3.

``PeerSource.fetch`` has the fetcher's contract (a verified temp file, or NeedSpace, DiskFull,
Cancelled, FetchFailed, ChecksumMismatch, ObjectChanged from S3). For an object another host owns,
and while that host is not marked out, it asks the owner; anything the owner cannot give — refused,
timed out, reset, wrong bytes — marks the owner out for a while when it is the owner's fault
(``members.Health``) and the object comes from S3 in the same call. So a peer's bad bytes never reach
the verifier's count of stable wrong digests (``WrongChecksum`` is judged on S3's bytes only), and the
worker sees a peer failure only as a slower fetch.

A peer's transfer may take ``peer_timeout`` plus twice what S3 would take for its size (``Pace``: the
rate of this host's own recent S3 fetches, ``DEFAULT_RATE`` until there is one), so a reader never
waits on a slow peer much longer than on S3.

Counts (under ``_lock``): objects and bytes from S3 and from peers, peer attempts that failed by why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from s3cache.fetch.fetcher import Fetched, Fetcher
from s3cache.fetch.parts import Early
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import shown

from .client import PeerClient, PeerFailed
from .members import Health

log = logging.getLogger("s3cache.peer")

DEFAULT_RATE = 10e6  # bytes/s assumed of one S3 fetch before this host has made one


class Pace:
    """How fast this host's S3 fetches go: an exponential average of bytes/s per object fetch (what a
    fetch of a similar object would take, latency included). Thread-safe."""

    def __init__(self, weight: float = 0.2) -> None:
        self._lock = threading.Lock()
        self._weight = weight
        self.rate: float | None = None

    def record(self, seconds: float, nbytes: int) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        r = nbytes / seconds
        with self._lock:
            self.rate = r if self.rate is None else self.rate + self._weight * (r - self.rate)

    def s3_seconds(self, size: int) -> float:
        """What S3 would take for ``size`` bytes, by this host's recent fetches."""
        with self._lock:
            rate = self.rate or DEFAULT_RATE
        return size / rate


class PeerSource:
    def __init__(self, fetcher: Fetcher, client: PeerClient, *, me: str, owner: Callable[[str], str],
                 health: Health, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.fetcher = fetcher
        self.client = client
        self.me = me
        self._owner = owner
        self.health = health
        self._clock = clock
        self._timeout = timeout
        self.pace = Pace()
        self._lock = threading.Lock()
        self.from_s3 = [0, 0]  # objects, bytes
        self.from_peers = [0, 0]
        self.peer_failures: dict[str, int] = {}

    def fetch(self, entry: Entry, admit: Callable[[int], bool], foreground: bool = False,
              early: Early | int | None = None) -> Fetched:
        owner = self._owner(entry.uri)
        if owner != self.me and self.health.usable(owner, self._clock()):
            try:
                got = self.client.get(owner, entry, admit,
                                      lambda size: self._timeout + 2 * self.pace.s3_seconds(size))
            except PeerFailed as e:
                with self._lock:
                    self.peer_failures[e.why] = self.peer_failures.get(e.why, 0) + 1
                if e.marks_out:
                    self.health.fail(owner, e.why, self._clock())
                    log.warning("peer %s could not give %s (%s); it is skipped for a while, fetching from S3",
                                owner, shown(entry.uri), e)
                else:
                    log.debug("peer %s did not give %s (%s); fetching from S3", owner, shown(entry.uri), e)
            else:
                with self._lock:
                    self.from_peers[0] += 1
                    self.from_peers[1] += got.size
                return got
        started = time.monotonic()
        got = self.fetcher.fetch(entry, admit, foreground=foreground, early=early)
        self.pace.record(time.monotonic() - started, got.size)
        with self._lock:
            self.from_s3[0] += 1
            self.from_s3[1] += got.size
        return got

    def promote(self, uri: str) -> bool:
        return self.fetcher.promote(uri)

    def status(self) -> dict:
        with self._lock:
            return {"from_s3": {"objects": self.from_s3[0], "bytes": self.from_s3[1]},
                    "from_peers": {"objects": self.from_peers[0], "bytes": self.from_peers[1]},
                    "peer_failures": dict(self.peer_failures), "s3_heads_for_checks": self.client.s3_heads,
                    "s3_bytes_per_second": round(self.pace.rate or 0.0)}
