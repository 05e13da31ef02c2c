"""The retry policy: what earns another attempt, what fails at once, and the throttle workers share.

Errors are botocore's real exception classes, built as botocore builds them from an S3 answer."""

from __future__ import annotations

import logging
import threading

import botocore.exceptions
import pytest

from s3cache.errors import ChecksumMismatch, FetchFailed, ObjectChanged
from s3cache.fetch.retry import Cancelled, Retry, RetryPolicy, classify, error_code
from s3cache.fetch.s3api import Counters
from s3cache.testing import wait_for


def client_error(code: str | None, status: int, message: str = "") -> botocore.exceptions.ClientError:
    err = {"Message": message}
    if code:
        err["Code"] = code
    return botocore.exceptions.ClientError({"Error": err, "ResponseMetadata": {"HTTPStatusCode": status}},
                                           "GetObject")


@pytest.mark.parametrize("code,status,throttled", [
    ("SlowDown", 503, True), ("ThrottlingException", 400, True), (None, 429, True),
    ("InternalError", 500, False), (None, 502, False), ("RequestTimeout", 400, False),
])
def test_transient_answers_are_retried(code, status, throttled):
    verdict = classify(client_error(code, status), "s3://b/k")
    assert isinstance(verdict, Retry) and verdict.throttled == throttled


@pytest.mark.parametrize("code,status,want", [
    ("NoSuchKey", 404, "NoSuchKey"), (None, 404, "NoSuchKey"), (None, 403, "AccessDenied"),
    ("NoSuchBucket", 404, "NoSuchBucket"), ("InvalidRange", 416, "InvalidRange"),
])
def test_permanent_answers_fail_with_their_code(code, status, want):
    verdict = classify(client_error(code, status, "nope"), "s3://b/k")
    assert isinstance(verdict, FetchFailed) and verdict.code == want and verdict.uri == "s3://b/k"
    assert error_code(client_error(code, status))[0] == want


def test_other_errors():
    assert isinstance(classify(client_error("PreconditionFailed", 412), "s3://b/k"), ObjectChanged)
    nocred = classify(botocore.exceptions.NoCredentialsError(), "s3://b/k")
    assert isinstance(nocred, FetchFailed) and nocred.code == "NoCredentials"
    for transient in (ConnectionResetError(), TimeoutError(), ChecksumMismatch("flipped"),
                      botocore.exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2)):
        assert isinstance(classify(transient, "s3://b/k"), Retry), transient
    odd = ValueError("ours")
    assert classify(odd, "s3://b/k") is odd  # unknown: raised as is, never retried


def test_backoff_is_jittered_under_an_exponential_cap():
    p = RetryPolicy(8, threading.Event(), Counters())
    for attempt in range(12):
        cap = min(20.0, 0.1 * 2 ** attempt)
        samples = [p.backoff(attempt) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap / 2  # full jitter spreads over the whole window


class Flaky:
    """An operation that fails with the given errors, in order, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_failures_are_retried_until_success():
    counters = Counters()
    op = Flaky(ConnectionResetError(), client_error("InternalError", 500))
    assert RetryPolicy(5, threading.Event(), counters).run("s3://b/k", op) == "ok"
    assert op.calls == 3 and counters.retries == 2 and counters.throttled == 0


def test_gives_up_after_max_attempts_naming_the_last_code():
    op = Flaky(*[client_error("InternalError", 500)] * 10)
    with pytest.raises(FetchFailed) as ei:
        RetryPolicy(3, threading.Event(), Counters()).run("s3://b/k", op)
    assert op.calls == 3 and ei.value.code == "InternalError" and "3 attempts" in str(ei.value)


class Recording(threading.Event):
    """The policy's cancel event, noting each backoff wait (``wait(delay)``) in ``events`` beside the
    operation's calls: the order of events, not a clock, shows when the policy waits."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def wait(self, timeout: float | None = None) -> bool:
        self.events.append("wait")
        return super().wait(0)  # the order is what is checked: no need to sit out the backoff


def test_the_last_attempt_is_not_followed_by_a_backoff():
    """The caller learns at once that the last attempt failed: no wait after it, and no retry counted."""
    events: list[str] = []
    failing = Flaky(*[client_error("InternalError", 500)] * 10)

    def op() -> str:
        events.append("call")
        return failing()

    counters = Counters()
    with pytest.raises(FetchFailed):
        RetryPolicy(3, Recording(events), counters).run("s3://b/k", op)
    assert events == ["call", "wait", "call", "wait", "call"]
    assert counters.retries == 2


def test_a_checksum_mismatch_that_never_clears_is_raised_as_itself():
    op = Flaky(*[ChecksumMismatch("bad")] * 5)
    with pytest.raises(ChecksumMismatch):
        RetryPolicy(2, threading.Event(), Counters()).run("s3://b/k", op)
    assert op.calls == 2


def test_permanent_failures_are_tried_once():
    counters = Counters()
    op = Flaky(client_error("NoSuchKey", 404))
    with pytest.raises(FetchFailed):
        RetryPolicy(5, threading.Event(), counters).run("s3://b/k", op)
    assert op.calls == 1 and counters.retries == 0


def test_a_throttled_answer_holds_back_every_worker():
    cancel = threading.Event()
    p = RetryPolicy(2, cancel, Counters())
    p.backoff = lambda attempt: 3600.0  # one throttled answer holds the throttle for an hour
    op = Flaky(client_error("SlowDown", 503))

    def cancel_once_throttled() -> None:
        wait_for(lambda: p.throttled_until() > 0, 30, "the throttle to be set")
        cancel.set()

    cancel_after_throttle = threading.Thread(target=cancel_once_throttled)
    cancel_after_throttle.start()
    with pytest.raises(Cancelled):
        p.run("s3://b/a", op)  # waits out its own backoff until cancelled
    cancel_after_throttle.join()
    assert p.throttled_until() > 0
    # Another worker's fresh operation does not start while the throttle holds: it is cancelled instead.
    cancel.clear()
    other = Flaky()
    stopper = threading.Timer(0.05, cancel.set)
    stopper.start()
    with pytest.raises(Cancelled):
        p.run("s3://b/other", other)
    stopper.join()
    assert other.calls == 0


def test_cancel_stops_at_once():
    cancel = threading.Event()
    cancel.set()
    op = Flaky()
    with pytest.raises(Cancelled):
        RetryPolicy(3, cancel, Counters()).run("s3://b/k", op)
    assert op.calls == 0


def test_s3_unreachable_is_told_in_three_lines_not_one_per_attempt(caplog):
    """Twenty objects, three attempts each, S3 refusing every connection: one line when it becomes
    unreachable, a summary a minute (objects waiting, for how long), one line when it answers again;
    every attempt's retry at debug only."""
    clock = Clock()
    p = RetryPolicy(3, threading.Event(), Counters(), clock=clock)
    p.backoff = lambda attempt: 0.0
    refused = botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.example:9/b/k")
    caplog.set_level(logging.DEBUG, logger="s3cache")
    for i in range(20):
        with pytest.raises(FetchFailed) as ei:
            p.run(f"s3://b/k{i:02d}", Flaky(*[refused] * 3))
        assert p.outage.explains(ei.value.code)  # the daemon's own "failed" line stays at debug then
        clock.t += 1.0
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(told) == 1 and told[0].startswith("S3 is unreachable (EndpointConnectionError")
    # two retries an object: none after its third and last attempt
    assert sum("retrying" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 40
    clock.t += 60  # a minute on, still refused: one summary
    with pytest.raises(FetchFailed):
        p.run("s3://b/k00", Flaky(*[refused] * 3))
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(told) == 2 and told[1] == ("S3 still unreachable after 80 s: 20 object(s) waiting, the oldest "
                                          "for 80 s (EndpointConnectionError)")
    assert p.run("s3://b/k05", Flaky(refused)) == "ok"  # S3 is back
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert told[2:] == ["S3 answers again after 80 s unreachable (20 object(s) were waiting)"]
    assert not p.outage.active and not p.outage.explains("EndpointConnectionError")


def test_an_answer_of_any_kind_ends_the_outage_and_a_permanent_one_stops_the_wait():
    clock = Clock()
    p = RetryPolicy(2, threading.Event(), Counters(), clock=clock)
    p.backoff = lambda attempt: 0.0
    timeout = botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3.example/b/k")
    with pytest.raises(FetchFailed):
        p.run("s3://b/a", Flaky(timeout, timeout))
    with pytest.raises(FetchFailed):
        p.run("s3://b/gone", Flaky(timeout, client_error("NoSuchKey", 404)))
    assert not p.outage.active and p.outage.waiting == {}  # S3 answered (a 404 is an answer)
    with pytest.raises(FetchFailed):
        p.run("s3://b/a", Flaky(timeout, timeout))
    assert p.outage.waiting == {"s3://b/a": 0.0}
    with pytest.raises(FetchFailed):
        p.run("s3://b/a", Flaky(client_error("NoSuchKey", 404)))
    assert not p.outage.active  # an answer, which also ends the outage


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t
