"""Failed objects: which failures are worth trying again, when, and a bounded table of them.

A failure is *permanent* when fetching again cannot help until something changes that the daemon can
see: the manifest entry (a new checksum, size or version) or, for ``NoSuchKey``, the object appearing.
Everything else is *transient* and is tried again with exponential backoff, for ever, at a bounded
rate: a 5xx after the fetcher's own attempts, a connection error, throttling, a file that failed to
publish, and also ``AccessDenied``, ``NoSuchBucket`` and missing credentials — in the field a bucket is
created, a policy fixed or credentials mounted after the daemon started, so those are retried too, on
a longer backoff (``SLOW``).

The rules, in one place (README "Failures" says the same):

* permanent (``PERMANENT``): never retried in the background; a reader asking for one is answered
  ``failed`` at once with the reason, without a download. Cleared when the manifest's entry for the
  object changes (or the daemon restarts);
* ``NoSuchKey`` / ``NoSuchVersion`` (``RECHECK``): permanent for prefetch, but a reader asking for the
  object checks once more (one GET): objects are often uploaded after a job listed them;
* transient: retried after ``retry_delay(code, attempts)`` seconds (jittered, capped), and a reader
  asking for one fetches it at once.

``Failures`` keeps at most ``MAX_FAILED`` objects (least recently failed dropped first: a forgotten
failure is simply fetched again when next wanted) and hands out at most ``RETRY_BURST`` due retries
per call, so ten thousand objects of a missing bucket cost a bounded request rate.

Not thread-safe: its owner (the schedule) calls it with the daemon's state lock held.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from s3cache.manifest.parse import Entry

MAX_FAILED = 10_000
RETRY_BURST = 50  # due retries released per call (the daemon calls once a second)

PERMANENT = frozenset({
    "WrongChecksum",  # the manifest's checksum disagrees with stable bytes (the fetcher proved it)
    "NoChecksum",  # checksums required and nothing can vouch for the bytes
    "TooLarge",  # larger than --max-size
    "SizeMismatch",  # the manifest's size= is not S3's
    "InvalidObjectState",  # archived (Glacier): needs a restore first
    "UnsafeKey",
})
RECHECK = frozenset({"NoSuchKey", "NoSuchVersion"})  # permanent, but a reader's ask checks once more
SLOW = frozenset({  # configuration that is often fixed later: retried, on a long backoff
    "AccessDenied", "NoSuchBucket", "NoCredentials", "AllAccessDisabled", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccountProblem", "PermanentRedirect",
    "AuthorizationHeaderMalformed",
})

# (first delay, cap) in seconds
FAST_BACKOFF = (5.0, 600.0)
SLOW_BACKOFF = (30.0, 1800.0)


def is_permanent(code: str) -> bool:
    return code in PERMANENT or code in RECHECK


def retry_delay(code: str, attempts: int) -> float | None:
    """Seconds before trying again after ``attempts`` failures in a row (1 after the first) with
    ``code``; None for a permanent failure. Exponential, capped, with jitter (half to all of it) so
    that objects that failed together do not come back together. Usable for prefix listings too."""
    if is_permanent(code):
        return None
    first, cap = SLOW_BACKOFF if code in SLOW else FAST_BACKOFF
    delay = min(cap, first * (2 ** min(max(attempts - 1, 0), 20)))
    return delay * random.uniform(0.5, 1.0)


@dataclass
class Failure:
    """One failed object: ``entry`` as it was when it failed (a changed manifest entry clears a
    permanent failure), ``attempts`` failures in a row, ``retry_at`` (monotonic) or None (permanent)."""

    entry: Entry
    code: str
    message: str
    attempts: int
    retry_at: float | None
    when: float  # wall clock, for status

    @property
    def permanent(self) -> bool:
        return self.retry_at is None

    def describe(self, now: float) -> dict:
        d = {"uri": self.entry.ref.display, "code": self.code, "message": self.message, "attempts": self.attempts,
             "permanent": self.permanent}
        d["retry_in"] = None if self.retry_at is None else round(max(0.0, self.retry_at - now), 1)
        return d


class Failures:
    """URI -> Failure, least recently failed first, at most ``cap`` of them; a heap of retry times.

    Invariant: every transient failure in the table has one live heap item (retry_at, uri); items of
    failures since replaced or removed are skipped when popped (checked against the table)."""

    def __init__(self, cap: int = MAX_FAILED) -> None:
        self.cap = cap
        self._table: OrderedDict[str, Failure] = OrderedDict()
        self._heap: list[tuple[float, str]] = []
        self._attempts: OrderedDict[str, int] = OrderedDict()  # failures in a row, kept across a retry
        self.dropped = 0  # failures forgotten to stay under the cap

    def __contains__(self, uri: str) -> bool:
        return uri in self._table

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def get(self, uri: str) -> Failure | None:
        return self._table.get(uri)

    def add(self, entry: Entry, code: str, message: str, now: float | None = None) -> Failure:
        now = time.monotonic() if now is None else now
        uri = entry.uri
        attempts = self._attempts.pop(uri, 0) + 1
        self._attempts[uri] = attempts
        delay = retry_delay(code, attempts)
        f = Failure(entry, code, message, attempts, None if delay is None else now + delay, time.time())
        self._table.pop(uri, None)
        self._table[uri] = f
        if f.retry_at is not None:
            heapq.heappush(self._heap, (f.retry_at, uri))
        while len(self._table) > self.cap:
            old, _ = self._table.popitem(last=False)
            self._attempts.pop(old, None)
            self.dropped += 1
        while len(self._attempts) > self.cap:
            self._attempts.popitem(last=False)
        if len(self._heap) > 4 * self.cap + 64:  # stale items of replaced failures: rebuild
            self._heap = [(f.retry_at, u) for u, f in self._table.items() if f.retry_at is not None]
            heapq.heapify(self._heap)
        return f

    def discard(self, uri: str) -> Failure | None:
        """Forget the failure (the object is fetched again now); its attempt count is kept."""
        return self._table.pop(uri, None)

    def succeeded(self, uri: str) -> None:
        self._table.pop(uri, None)
        self._attempts.pop(uri, None)

    def due(self, now: float, limit: int = RETRY_BURST) -> list[Failure]:
        """Up to ``limit`` transient failures whose retry time has come, removed from the table."""
        out: list[Failure] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            at, uri = heapq.heappop(self._heap)
            f = self._table.get(uri)
            if f is not None and f.retry_at == at:
                del self._table[uri]
                out.append(f)
        return out

    def keep_if(self, keep) -> None:
        """Drop every failure for which ``keep(uri, failure)`` is false."""
        for uri in [u for u, f in self._table.items() if not keep(u, f)]:
            del self._table[uri]

    def items(self):
        return self._table.items()

    def counts(self) -> tuple[int, int]:
        """(permanent, transient) failures now."""
        perm = sum(1 for f in self._table.values() if f.permanent)
        return perm, len(self._table) - perm
