"""Retry and throttle policy for S3 requests: which failures earn another attempt, how long to wait, and
one throttle that every worker of a fetcher shares.

Invariants:

* An operation runs at most ``max_attempts`` times; then it fails with the last error (a
  ``ChecksumMismatch`` as itself, anything else as ``FetchFailed`` naming the S3 error code).
* Permanent errors (NoSuchKey, AccessDenied, NoSuchBucket, no credentials, ...) are never retried: they
  fail at once as ``FetchFailed`` with S3's code. A 412 becomes ``ObjectChanged`` (the caller decides).
* Our own typed errors (``S3CacheError``) pass through untouched unless they say they are transient
  (``ChecksumMismatch``: a byte flipped on the wire; ``BadResponse``: an answer that does not fit the
  request). ``WrongChecksum`` is a mismatch known not to be transient: it is never retried.
* Backoff is exponential with full jitter, capped at 20 s, and only between attempts: after the last
  one the failure is raised at once. A throttled answer (SlowDown, 429, 503)
  pushes back every request of every worker until the backoff has passed, so a burst of 503s is not
  answered by a retry storm.
* Setting ``cancel`` ends every wait at once with ``Cancelled``.
* Logging stays a few lines however long S3 is away: each attempt's retry is logged at debug; while
  requests cannot reach S3 (``Outage``) one line says so, one summary a minute says how many objects
  wait and for how long, and one line says when S3 answers again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import botocore.exceptions
import urllib3.exceptions

from s3cache.errors import (
    ChecksumMismatch,
    FetchFailed,
    ObjectChanged,
    S3CacheError,
    WrongChecksum,
)
from s3cache.service.config import redact_urls

log = logging.getLogger("s3cache.fetch")

T = TypeVar("T")

RETRY_CODES = frozenset({
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "BadDigest",
})
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                            "TooManyRequests"})
_PERMANENT_BY_STATUS = {403: "AccessDenied", 404: "NoSuchKey", 400: "BadRequest", 416: "InvalidRange"}


class Cancelled(S3CacheError):
    """The daemon is stopping; the download was abandoned and its temp file removed."""


class BadResponse(S3CacheError):
    """An answer that does not fit its request (a ``200`` to a ranged GET after the first, a
    ``Content-Range`` other than the one asked for, more bytes than asked, a part HEAD without a part
    count): worth another attempt, as proxies and caches in the path give such answers now and then."""


class Retry(Exception):
    """``classify``'s verdict that an error is transient; ``throttled`` when the server asked us to slow down."""

    def __init__(self, cause: BaseException, throttled: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.throttled = throttled


class _Counts(Protocol):
    def add(self, **kw: int) -> None: ...


def error_code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    """S3's error code (or one named for the HTTP status when the body had none) and the HTTP status."""
    err = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = err.get("Code") or str(status)
    if code.isdigit():
        code = _PERMANENT_BY_STATUS.get(int(code), code)
    return code, status


def classify(e: BaseException, uri: str) -> BaseException:
    """Map an exception to a ``Retry``, or to the typed error to give up with (``e`` itself if unknown)."""
    if isinstance(e, botocore.exceptions.ClientError):
        code, status = error_code(e)
        if code == "PreconditionFailed" or status == 412:
            return ObjectChanged(f"{uri} changed in S3 during the download")
        if code in RETRY_CODES or status >= 500 or status == 429:
            return Retry(e, throttled=code in THROTTLE_CODES or status in (429, 503))
        return FetchFailed(uri, code, e.response.get("Error", {}).get("Message", ""))
    if isinstance(e, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return FetchFailed(uri, "NoCredentials", "no AWS credentials found (boto3's credential chain)")
    if isinstance(e, (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError,
                      ConnectionError, TimeoutError)):
        return Retry(e)
    if (isinstance(e, ChecksumMismatch) and not isinstance(e, WrongChecksum)) or isinstance(e, BadResponse):
        return Retry(e)  # a flipped byte or a stray answer on the way: fetch again, up to max_attempts
    return e


UNREACHABLE = (botocore.exceptions.ConnectionError, botocore.exceptions.ReadTimeoutError)  # no answer at all
SUMMARY_EVERY = 60.0  # seconds between "still unreachable" lines
_GONE = "S3 is unreachable (%s: %s); retrying with backoff, one line a minute until it answers"


class Outage:
    """Whether S3 can be reached, as the requests of one fetcher find it, told in three kinds of line.

    It begins at a request that got no answer (refused, timed out connecting or reading: ``UNREACHABLE``)
    and ends at the next request that got one. ``waiting`` maps each object whose request went
    unanswered during it, and has not been fetched or failed for good since, to when that first
    happened. Invariant: ``since`` is None exactly when no outage is under way, and then ``waiting`` is
    empty. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.since: float | None = None
        self.waiting: dict[str, float] = {}
        self._said = 0.0  # when the last line about this outage was written
        self._codes: set[str] = set()  # the errors seen during it (what ``FetchFailed`` names as code)

    @property
    def active(self) -> bool:
        return self.since is not None

    def unanswered(self, uri: str, e: BaseException) -> None:
        """A request for ``uri`` got no answer."""
        now = self._clock()
        with self._lock:
            self.waiting.setdefault(uri, now)
            self._codes.add(type(e).__name__)
            if self.since is None:
                self.since = self._said = now
                line = (_GONE, (type(e).__name__, redact_urls(str(e))))
            elif now - self._said >= SUMMARY_EVERY:
                self._said = now
                oldest = now - min(self.waiting.values())
                line = ("S3 still unreachable after %.0f s: %d object(s) waiting, the oldest for %.0f s (%s)",
                        (now - self.since, len(self.waiting), oldest, type(e).__name__))
            else:
                return
        log.warning(line[0], *line[1])

    def answered(self, uri: str) -> None:
        """A request for ``uri`` got an answer (any answer: S3 is there)."""
        if self.since is None:  # the common case, without the lock
            return
        now = self._clock()
        with self._lock:
            if self.since is None:
                return
            took, waited = now - self.since, len(self.waiting)
            self.since = None
            self.waiting.clear()
            self._codes.clear()
        log.warning("S3 answers again after %.0f s unreachable (%d object(s) were waiting)", took, waited)

    def explains(self, code: str) -> bool:
        """Whether a failure with ``code`` is this outage's doing (then it was told already, and an
        object giving up on it is not worth its own line)."""
        with self._lock:
            return self.since is not None and code in self._codes

    def gave_up(self, uri: str) -> None:
        """``uri`` failed for good (a permanent answer, or cancelled): no longer waiting."""
        with self._lock:
            self.waiting.pop(uri, None)


class RetryPolicy:
    """Runs operations under the invariants above. One per fetcher: the throttle is shared by its workers."""

    def __init__(self, max_attempts: int, cancel: threading.Event, counters: _Counts,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_attempts = max_attempts
        self.cancel = cancel
        self.counters = counters
        self.outage = Outage(clock)
        self._throttle_until = 0.0
        self._lock = threading.Lock()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based): full jitter, capped at 20 s."""
        return random.uniform(0, min(20.0, 0.1 * (2 ** attempt)))

    def wait_throttle(self) -> None:
        """Block while the shared throttle holds; raise Cancelled if cancelled meanwhile."""
        delay = self._throttle_until - time.monotonic()
        if delay > 0 and self.cancel.wait(delay):
            raise Cancelled("stopping")

    def throttled_until(self) -> float:
        """The monotonic time before which no request starts (0 or past when not throttled)."""
        return self._throttle_until

    def run(self, uri: str, op: Callable[[], T]) -> T:
        """Run ``op`` until it succeeds, fails for good, or runs out of attempts (keeping the last error)."""
        last: BaseException | None = None
        for attempt in range(self.max_attempts):
            if self.cancel.is_set():
                raise Cancelled("stopping")
            self.wait_throttle()
            try:
                result = op()
            except Exception as e:  # classified: anything unknown is re-raised as is
                if isinstance(e, UNREACHABLE):
                    if not self.cancel.is_set():  # not a hang-up of our own, stopping
                        self.outage.unanswered(uri, e)
                elif not isinstance(e, Cancelled):
                    self.outage.answered(uri)
                verdict = classify(e, uri)
                if not isinstance(verdict, Retry):
                    self.outage.gave_up(uri)
                    if verdict is e:
                        raise
                    raise verdict from e
                last = verdict.cause
                delay = self.backoff(attempt)
                if verdict.throttled:  # the other workers slow down even when this one gives up
                    with self._lock:
                        self._throttle_until = max(self._throttle_until, time.monotonic() + delay)
                if attempt + 1 == self.max_attempts:
                    break  # no backoff after the last attempt: the caller learns of the failure at once
                self.counters.add(retries=1, throttled=int(verdict.throttled))
                log.debug("retrying %s after %s (attempt %d/%d, %.2fs)", uri,
                          type(last).__name__, attempt + 1, self.max_attempts, delay)
                if self.cancel.wait(delay):
                    self.outage.gave_up(uri)
                    raise Cancelled("stopping")
                continue
            self.outage.answered(uri)
            return result
        if isinstance(last, ChecksumMismatch):
            raise last
        code = type(last).__name__ if last else "Unknown"
        if isinstance(last, botocore.exceptions.ClientError):
            code = error_code(last)[0]
        raise FetchFailed(uri, code, f"gave up after {self.max_attempts} attempts: {last}")
