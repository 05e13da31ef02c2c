"""Failed objects (s3cache.daemon.failures), pure: which codes are retried and when, and the bounded table
the schedule keeps them in. The daemon relies on: permanent failures never come back on their own,
transient ones come back after a growing, capped, jittered delay, at a bounded rate, and the table and
its retry heap stay bounded however many objects fail."""

from __future__ import annotations

import pytest
from parts import entry

from s3cache.daemon.failures import (
    FAST_BACKOFF,
    MAX_FAILED,
    PERMANENT,
    RECHECK,
    RETRY_BURST,
    SLOW,
    SLOW_BACKOFF,
    Failure,
    Failures,
    is_permanent,
    retry_delay,
)

B = "s3://bucket/"


def test_permanent_codes_and_rechecked_ones_are_permanent_and_the_rest_are_not():
    assert all(is_permanent(c) for c in PERMANENT | RECHECK)
    assert {"NoSuchKey", "NoSuchVersion", "WrongChecksum", "UnsafeKey"} <= PERMANENT | RECHECK
    for code in ("InternalError", "SlowDown", "ConnectionError", *SLOW):
        assert not is_permanent(code)
        assert retry_delay(code, 1) is not None
    for code in PERMANENT | RECHECK:
        assert retry_delay(code, 1) is None


def samples(code: str, attempts: int, n: int = 300) -> list[float]:
    return [retry_delay(code, attempts) for _ in range(n)]


@pytest.mark.parametrize("code, backoff", [("InternalError", FAST_BACKOFF), ("AccessDenied", SLOW_BACKOFF)])
def test_the_delay_doubles_from_the_first_up_to_the_cap_with_half_to_full_jitter(code, backoff):
    first, cap = backoff
    assert (first, cap) in {(5.0, 600.0), (30.0, 1800.0)}
    for attempts, full in [(0, first), (1, first), (2, 2 * first), (3, 4 * first), (30, cap), (10**6, cap)]:
        got = samples(code, attempts)
        assert all(full / 2 <= d <= full for d in got), (attempts, min(got), max(got))
        # jittered over the whole range, not a fixed fraction (300 draws: both ends are reached)
        assert min(got) < 0.6 * full and max(got) > 0.9 * full


def test_the_delay_before_the_cap_is_below_it():
    first, cap = FAST_BACKOFF
    n = next(k for k in range(1, 40) if first * 2 ** (k - 1) >= cap)
    assert max(samples("InternalError", n - 1)) <= first * 2 ** (n - 2) < cap


def failure(code="InternalError", retry_at=None, attempts=1, uri=B + "k"):
    return Failure(entry(uri), code, "the message", attempts, retry_at, 0.0)


def test_a_failure_describes_itself_for_status():
    assert failure(retry_at=None).describe(100.0) == {
        "uri": B + "k", "code": "InternalError", "message": "the message", "attempts": 1, "permanent": True,
        "retry_in": None}
    d = failure(retry_at=112.34, attempts=3).describe(100.0)
    assert d["permanent"] is False and d["retry_in"] == 12.3 and d["attempts"] == 3
    assert failure(retry_at=90.0).describe(100.0)["retry_in"] == 0.0  # overdue: never negative


def test_a_transient_failure_is_due_after_its_delay_and_then_leaves_the_table():
    f = Failures()
    got = f.add(entry(B + "a"), "InternalError", "503", now=1000.0)
    assert not got.permanent and got.attempts == 1 and 1000.0 + 2.5 <= got.retry_at <= 1000.0 + 5.0
    assert B + "a" in f and len(f) == 1 and list(f) == [B + "a"] and f.get(B + "a") is got
    assert f.due(got.retry_at - 0.001) == [] and B + "a" in f
    assert f.due(got.retry_at) == [got]  # due exactly at its time
    assert B + "a" not in f and f.get(B + "a") is None and f.due(10**9) == []


def test_a_permanent_failure_stays_and_is_never_due():
    f = Failures()
    got = f.add(entry(B + "a"), "WrongChecksum", "bad", now=0.0)
    assert got.permanent and got.retry_at is None and got.code == "WrongChecksum" and got.message == "bad"
    assert f.due(10**12) == [] and B + "a" in f
    assert f.counts() == (1, 0)


def test_attempts_count_failures_in_a_row_across_retries_until_a_success():
    f = Failures()
    for n in (1, 2, 3):
        got = f.add(entry(B + "a"), "InternalError", "", now=0.0)
        assert got.attempts == n
        assert f.discard(B + "a") is got  # fetched again: the failure goes, its count stays
        assert f.discard(B + "a") is None
    assert f.add(entry(B + "a"), "InternalError", "", now=0.0).attempts == 4
    assert 10.0 <= f.get(B + "a").retry_at <= 40.0  # the fourth in a row waits 20-40 s, not 2.5-5 s
    f.succeeded(B + "a")
    assert B + "a" not in f
    assert f.add(entry(B + "a"), "InternalError", "", now=0.0).attempts == 1


def test_a_replaced_failure_is_due_only_at_its_new_time():
    f = Failures()
    first = f.add(entry(B + "a"), "InternalError", "", now=0.0)
    second = f.add(entry(B + "a"), "InternalError", "", now=100.0)
    assert len(f) == 1 and f.get(B + "a") is second
    assert f.due(first.retry_at) == [] and B + "a" in f  # the old heap item is stale
    assert f.due(second.retry_at) == [second]
    third = f.add(entry(B + "b"), "InternalError", "", now=0.0)
    f.add(entry(B + "b"), "WrongChecksum", "", now=0.0)  # became permanent: its retry is gone
    assert f.due(third.retry_at + 10**6) == [] and f.counts() == (1, 0)


def test_due_hands_out_at_most_the_burst_earliest_first():
    f = Failures()
    made = [f.add(entry(f"{B}{i}"), "InternalError", "", now=float(i)) for i in range(RETRY_BURST + 10)]
    assert RETRY_BURST == 50
    first = f.due(10**6)
    assert len(first) == RETRY_BURST and first == sorted(made, key=lambda x: x.retry_at)[:RETRY_BURST]
    assert len(f.due(10**6, limit=3)) == 3 and len(f.due(10**6)) == 7 and len(f) == 0


def test_the_table_keeps_the_most_recently_failed_up_to_its_cap():
    assert MAX_FAILED == 10_000 and Failures().cap == MAX_FAILED
    f = Failures(cap=3)
    for name in "abcd":
        f.add(entry(B + name), "NoSuchKey", "", now=0.0)
    assert list(f) == [B + "b", B + "c", B + "d"] and f.dropped == 1
    f.add(entry(B + "b"), "NoSuchKey", "", now=0.0)  # failed again: now the most recent
    f.add(entry(B + "e"), "NoSuchKey", "", now=0.0)
    assert list(f) == [B + "d", B + "b", B + "e"] and f.dropped == 2
    # a dropped failure's count is forgotten with it: it starts again at one
    assert f.add(entry(B + "a"), "NoSuchKey", "", now=0.0).attempts == 1


def test_attempt_counts_of_discarded_failures_are_bounded_too():
    f = Failures(cap=2)
    for name in "abc":
        f.add(entry(B + name), "InternalError", "", now=0.0)
        f.discard(B + name)
    assert len(f) == 0 and f.dropped == 0
    # the oldest count went to keep at most ``cap``; the two newest are kept
    assert [f.add(entry(B + n), "InternalError", "", now=0.0).attempts for n in "cba"] == [2, 2, 1]


def test_failing_one_object_over_and_over_keeps_the_retry_heap_bounded_and_right():
    f = Failures(cap=2)
    for i in range(200):
        last = f.add(entry(B + "a"), "InternalError", "", now=float(i))
        assert len(f._heap) <= 4 * f.cap + 64  # memory: stale retry items are dropped, not piled up
    perm = f.add(entry(B + "p"), "NoSuchKey", "", now=0.0)
    for i in range(200):
        last = f.add(entry(B + "a"), "InternalError", "", now=float(i))
    assert f.due(last.retry_at - 0.001) == []
    assert f.due(last.retry_at) == [last] and list(f) == [B + "p"] and f.get(B + "p") is perm


def test_keep_if_items_and_counts():
    f = Failures()
    f.add(entry(B + "a"), "InternalError", "", now=0.0)
    f.add(entry(B + "b"), "NoSuchKey", "", now=0.0)
    f.add(entry(B + "c"), "SlowDown", "", now=0.0)
    assert f.counts() == (1, 2)
    assert [(u, x.code) for u, x in f.items()] == [(B + "a", "InternalError"), (B + "b", "NoSuchKey"),
                                                  (B + "c", "SlowDown")]
    f.keep_if(lambda uri, x: uri != B + "a" and x.code != "SlowDown")
    assert list(f) == [B + "b"] and f.counts() == (1, 0)


def test_dropping_a_failure_whose_count_was_already_trimmed_is_fine():
    f = Failures(cap=2)
    f.add(entry(B + "a"), "InternalError", "", now=0.0)
    f.add(entry(B + "x"), "InternalError", "", now=0.0)
    f.discard(B + "x")  # x's count stays: a's, the oldest, is trimmed when b comes
    f.add(entry(B + "b"), "InternalError", "", now=0.0)
    f.add(entry(B + "c"), "InternalError", "", now=0.0)  # drops a from the table
    assert list(f) == [B + "b", B + "c"] and f.dropped == 1


def test_a_success_of_an_object_that_never_failed_changes_nothing():
    f = Failures()
    f.succeeded(B + "never")  # the daemon reports every success
    f.add(entry(B + "a"), "InternalError", "", now=0.0)
    f.discard(B + "a")
    f.succeeded(B + "a")  # out of the table already, its count still kept
    assert len(f) == 0 and f.add(entry(B + "a"), "InternalError", "", now=0.0).attempts == 1


def test_a_failure_without_a_time_is_timed_on_the_monotonic_clock_and_stamped_on_the_wall_clock():
    import time

    e = entry(B + "a")
    before, wall = time.monotonic(), time.time()
    got = Failures().add(e, "InternalError", "503 Slow Down")
    assert before + 2.5 <= got.retry_at <= time.monotonic() + 5.0
    assert wall <= got.when <= time.time() and got.entry is e
    assert got.describe(before)["uri"] == B + "a"
