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
* Backoff is exponential with full jitter, capped at 20 s. A throttled answer (SlowDown, 429, 503)
  pushes back every request of every worker until the backoff has passed, so a burst of 503s is not
  answered by a retry storm.
* Setting ``cancel`` ends every wait at once with ``Cancelled``.
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

from s3cache.errors import ChecksumMismatch, FetchFailed, ObjectChanged, S3CacheError, WrongChecksum

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


class RetryPolicy:
    """Runs operations under the invariants above. One per fetcher: the throttle is shared by its workers."""

    def __init__(self, max_attempts: int, cancel: threading.Event, counters: _Counts) -> None:
        self.max_attempts = max_attempts
        self.cancel = cancel
        self.counters = counters
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
                return op()
            except Exception as e:  # classified: anything unknown is re-raised as is
                verdict = classify(e, uri)
                if not isinstance(verdict, Retry):
                    if verdict is e:
                        raise
                    raise verdict from e
                last = verdict.cause
                delay = self.backoff(attempt)
                self.counters.add(retries=1, throttled=int(verdict.throttled))
                if verdict.throttled:
                    with self._lock:
                        self._throttle_until = max(self._throttle_until, time.monotonic() + delay)
                log.info("retrying %s after %s (attempt %d/%d, %.2fs)", uri,
                         type(last).__name__, attempt + 1, self.max_attempts, delay)
                if self.cancel.wait(delay):
                    raise Cancelled("stopping")
        if isinstance(last, ChecksumMismatch):
            raise last
        code = type(last).__name__ if last else "Unknown"
        if isinstance(last, botocore.exceptions.ClientError):
            code = error_code(last)[0]
        raise FetchFailed(uri, code, f"gave up after {self.max_attempts} attempts: {last}")
