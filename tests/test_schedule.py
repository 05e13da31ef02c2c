"""The schedule (s3cache/schedule.py) with a real space, catalog and reader tracker: demand first,
prefetch in manifest order, the readahead window, blocked and failed objects, the disk-full state."""

from __future__ import annotations

import time

import pytest
from parts import Rig, catalog, entry

from s3cache.manifest.refs import parse_uri
from s3cache.service.config import Readahead

B = "s3://bkt/"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    yield r
    r.close()


def uris(n: int) -> list[str]:
    return [f"{B}{i:03d}" for i in range(n)]


def test_demand_goes_first_then_the_manifest_in_order_skipping_what_is_ready(rig):
    u = uris(4)
    rig.install(catalog(*(entry(x, 10) for x in u)))
    rig.cached(u[1], b"x" * 10)
    with rig.cond:
        rig.schedule.push_front([entry(B + "extra")])
    assert rig.schedule.next_job() == (entry(B + "extra"), True)
    assert [rig.schedule.next_job() for _ in range(3)] == [(entry(u[0], 10), False), (entry(u[2], 10), False),
                                                           (entry(u[3], 10), False)]
    assert rig.schedule.fetching == {B + "extra", u[0], u[2], u[3]}  # never handed out twice


def test_a_stopping_daemon_hands_out_nothing(rig):
    rig.install(catalog(entry(B + "a", 1)))
    rig.stopping.set()
    assert rig.schedule.next_job() is None


def test_a_full_disk_holds_back_prefetch_but_not_a_waiting_reader(rig):
    import threading

    rig.install(catalog(entry(B + "a", 1)))
    with rig.cond:
        rig.schedule.push_front([entry(B + "d")])
        rig.space.mark_disk_full(1)
    # demand goes: its admission counts the filesystem's free bytes and evicts for it (issue 11.2)
    assert rig.schedule.next_job() == (entry(B + "d"), True)
    def stop_waiting() -> None:
        rig.stopping.set()
        with rig.cond:
            rig.cond.notify_all()

    stop = threading.Timer(0.5, stop_waiting)
    stop.start()
    assert rig.schedule.next_job() is None  # "a" is not prefetched while the disk is full
    stop.join()


def test_a_job_the_full_disk_ended_is_never_lost(rig):
    """Issue 17.12: after eviction made room, a prefetch goes back behind the cursor, a job a reader
    waits on goes first; a job eviction could not help is blocked and comes back (first when waited on)."""
    u = uris(3)
    rig.install(catalog(*(entry(x, 10) for x in u)))
    jobs = [rig.schedule.next_job() for _ in range(3)]
    assert rig.schedule.cursors.positions() == [2]
    with rig.cond:
        rig.schedule.ended(u[0])
        rig.schedule.again(jobs[0][0], False)  # evicted for it: try again from the cursor
        rig.readers.waiters[u[1]] = {object()}
        rig.schedule.ended(u[1])
        rig.schedule.again(jobs[1][0], False)  # a reader waits on it: first
        rig.schedule.ended(u[2])
        rig.schedule.park(jobs[2][0], False)  # nothing to evict: blocked until reconsidered
    assert rig.schedule.next_job() == (entry(u[1], 10), True)
    assert rig.schedule.next_job() == (entry(u[0], 10), False)
    assert u[2] in rig.schedule.blocked
    rig.schedule.reconsider()
    assert rig.schedule.next_job() == (entry(u[2], 10), False)


def test_no_room_blocks_and_pauses_prefetch_until_resumed_then_waited_on_objects_come_first(rig):
    u = uris(3)
    rig.install(catalog(*(entry(x, 10) for x in u)))
    job0, job1 = rig.schedule.next_job(), rig.schedule.next_job()
    with rig.cond:
        rig.schedule.no_room(job0[0].uri, demand=False)
        rig.schedule.no_room(job1[0].uri, demand=False)
        rig.readers.waiters[u[1]] = {object()}  # a reader now waits on u[1]
    assert rig.schedule.prefetch_paused and rig.schedule.blocked == {u[0], u[1]}
    rig.schedule.resume_prefetch()
    assert not rig.schedule.prefetch_paused and not rig.schedule.blocked
    assert rig.schedule.next_job() == (entry(u[1], 10), True)  # the waited-on one, as demand
    assert rig.schedule.next_job() == (entry(u[0], 10), False)  # the cursor moved back to it


def test_failed_objects_are_not_prefetched_until_a_reader_asks_or_the_manifest_changes_them(rig):
    u = uris(2)
    cat = catalog(*(entry(x, 10) for x in u))
    rig.install(cat)
    job = rig.schedule.next_job()
    with rig.cond:
        rig.schedule.fail(job[0].uri, "NoSuchKey", "gone")
    f = rig.schedule.failed.get(u[0])
    assert (f.code, f.message, f.permanent, f.attempts) == ("NoSuchKey", "gone", True, 1)
    assert rig.schedule.failures == 1
    assert rig.schedule.next_job() == (entry(u[1], 10), False)
    with rig.cond:
        assert rig.schedule.permanent_failure(u[0]) is None  # NoSuchKey: a reader's ask looks once more
        assert rig.schedule.ask(parse_uri(u[0])) == (entry(u[0], 10), False)
    assert u[0] not in rig.schedule.failed
    with rig.cond:
        rig.schedule.fail(u[0], "NoSuchKey", "gone")
    rig.install(cat)  # the same manifest: a permanent failure stays
    assert u[0] in rig.schedule.failed
    rig.install(catalog(entry(u[0], 11), entry(u[1], 10)))  # its line changed: fetched again
    assert not rig.schedule.failed


def test_ask_for_an_object_outside_the_manifest_remembers_it_and_reports_one_in_flight(rig):
    rig.install(catalog(entry(B + "a", 1)))
    assert rig.schedule.next_job()[0].uri == B + "a"
    with rig.cond:
        assert rig.schedule.ask(parse_uri(B + "a")) == (entry(B + "a", 1), True)
        assert rig.schedule.ask(parse_uri(B + "zz")) == (entry(B + "zz"), False)
    assert B + "zz" in rig.schedule.extra
    rig.install(catalog(entry(B + "zz", 2)))
    assert B + "zz" not in rig.schedule.extra  # listed now


def test_ahead_hints_queue_unlisted_objects_once_behind_the_demand(rig):
    rig.install(catalog(entry(B + "listed", 1)))
    with rig.cond:
        rig.schedule.push_front([entry(B + "now")])
        for x in ("later", "later", "listed"):
            rig.schedule.hint(parse_uri(B + x))
    assert list(rig.schedule.demand) == [entry(B + "now"), entry(B + "later")]


def test_with_a_reader_in_order_nothing_beyond_the_window_is_fetched_unless_it_fits(tmp_path):
    # --readahead 2f, but a cache of two files gets no window (evict.readahead_files): only free room
    rig = Rig(tmp_path / "cache", max_size=100, lease=600.0, readahead=Readahead(files=2))
    try:
        u = uris(10)
        rig.install(catalog(*(entry(x, 40) for x in u)))
        now = time.time()
        for p in range(4):  # a reader walks 0..3 in order: it will read 4 next
            rig.tracker.saw("r", p, 10, now)
        first = [rig.schedule.next_job()[0].uri for _ in range(2)]
        assert first == [u[4], u[5]]  # nearest first, while they fit in free room
        # 80 bytes reserved by the two in flight would not leave room for u[6] (40 bytes)
        rig.space.admit(entry(u[4], 40), 40, False)
        rig.space.admit(entry(u[5], 40), 40, False)
        with rig.cond:
            assert rig.schedule._next_prefetch() is None
        assert rig.schedule._scan_limited
        with rig.cond:
            rig.space.release(u[5])
            rig.schedule.ended(u[5])
        rig.schedule.reconsider()  # the window may have moved
        assert rig.schedule.next_job()[0].uri == u[5]
    finally:
        rig.close()


def test_status_counts_queued_fetching_and_failed(rig):
    u = uris(5)
    rig.install(catalog(*(entry(x, 10) for x in u)))
    rig.cached(u[0], b"x" * 10)
    job = rig.schedule.next_job()
    rig.schedule.next_job()
    with rig.cond:
        rig.schedule.fail(job[0].uri, "AccessDenied", "no")
        st = rig.schedule.status()
    assert (st["manifest_entries"], st["queued"], st["fetching"], st["failed"]) == (5, 2, 1, 1)
    assert [{k: f[k] for k in ("uri", "code", "message", "attempts", "permanent")} for f in st["failures"]] == [
        {"uri": u[1], "code": "AccessDenied", "message": "no", "attempts": 1, "permanent": False}]
    assert 15 <= st["failures"][0]["retry_in"] <= 30  # AccessDenied: the long backoff
    assert st["prefetch_paused"] is False and st["failures_total"] == 1


def test_transient_failures_come_back_after_their_backoff_and_permanent_ones_never(rig):
    """Issue 17 item 16: retried by kind, for ever with a growing backoff, at a bounded rate."""
    u = uris(3)
    rig.install(catalog(*(entry(x, 10) for x in u)))
    for _ in range(3):
        rig.schedule.next_job()
    now = time.monotonic()
    with rig.cond:
        rig.schedule.fail(u[0], "InternalError", "gave up after 8 attempts")  # 5xx: 2.5-5 s
        rig.schedule.fail(u[1], "WrongChecksum", "the manifest's sha256 is not the object's")
        rig.schedule.fail(u[2], "NoSuchBucket", "not yet")  # created later, usually: 15-30 s
        assert rig.schedule.retry_due(now) == 0
        assert rig.schedule.retry_due(now + 6) == 1
    assert rig.schedule.next_job() == (entry(u[0], 10), False)  # prefetched again, no manifest touched
    with rig.cond:
        again = rig.schedule.fail(u[0], "InternalError", "still")
        assert again.attempts == 2 and 5 <= again.retry_at - time.monotonic() <= 10.5  # doubled
        assert rig.schedule.retry_due(now + 31) == 2  # u[0] again, and the bucket's object
        assert rig.schedule.retry_due(now + 10 ** 6) == 0  # never u[1]
        st = rig.schedule.status()
    assert st["failed"] == 1 and st["failed_permanent"] == 1 and st["failed_retrying"] == 0
    assert st["failures"][0]["retry_in"] is None and st["retries_released"] == 3
    # a permanent failure answers a reader's ask at once; a transient one does not
    with rig.cond:
        assert rig.schedule.permanent_failure(u[1]).code == "WrongChecksum"
        assert rig.schedule.permanent_failure(u[0]) is None


def test_due_retries_are_released_at_a_bounded_rate():
    from s3cache.daemon.failures import RETRY_BURST, Failures

    f = Failures()
    for i in range(3 * RETRY_BURST):
        f.add(entry(f"{B}{i}"), "ServiceUnavailable", "503", now=0.0)
    assert [len(f.due(10 ** 6)) for _ in range(4)] == [RETRY_BURST, RETRY_BURST, RETRY_BURST, 0]


def test_failed_and_extra_are_bounded(rig):
    """Issue 17 item 14: at most 10,000 of each, the least recent forgotten first."""
    from s3cache.daemon.failures import MAX_FAILED
    from s3cache.daemon.schedule import MAX_EXTRA

    with rig.cond:
        for i in range(MAX_EXTRA + 5):
            rig.schedule.ask(parse_uri(f"{B}asked/{i}"))
        assert len(rig.schedule.extra) == MAX_EXTRA and f"{B}asked/0" not in rig.schedule.extra
        for i in range(MAX_FAILED + 5):
            rig.schedule.fail(f"{B}gone/{i}", "NoSuchKey", "")
        assert len(rig.schedule.failed) == MAX_FAILED and rig.schedule.failed.dropped == 5
        assert f"{B}gone/{MAX_FAILED + 4}" in rig.schedule.failed and f"{B}gone/0" not in rig.schedule.failed


def test_status_counts_each_queued_object_once(rig, tmp_path):
    """Issue 17 item 14: two wanted manifest objects are two queued objects, not four."""
    from parts import control_connection

    u = uris(2)
    rig.install(catalog(*(entry(x, 10) for x in u)))
    with control_connection(tmp_path) as (conn, _):
        rig.readers.want(conn, "r", u + [B + "unlisted"])
        with rig.cond:
            assert rig.schedule.status()["queued"] == 3  # two listed, one not; each once


def test_ahead_hints_cost_a_lookup_each_and_skip_failed_objects(rig):
    """Issue 18 item 4 and 17's "ahead hints re-queue permanently failed objects"."""
    from s3cache.daemon.schedule import MAX_EXTRA

    rig.install(catalog(entry(B + "listed", 1)))
    with rig.cond:
        rig.schedule.fail(B + "bad", "WrongChecksum", "x")
        rig.schedule.fail(B + "down", "ServiceUnavailable", "x")
        for x in ("bad", "down", "new", "new"):
            rig.schedule.hint(parse_uri(B + x))
        assert list(rig.schedule.demand) == [entry(B + "new")]
        for i in range(MAX_EXTRA + 10):
            rig.schedule.hint(parse_uri(f"{B}h/{i}"))
        assert len(rig.schedule.demand) == MAX_EXTRA and len(rig.schedule.extra) == MAX_EXTRA
        assert rig.schedule.hints_dropped == 11 and rig.schedule.hints_accepted == MAX_EXTRA
        assert rig.schedule.demand.has(f"{B}h/0") and not rig.schedule.demand.has(f"{B}h/{MAX_EXTRA}")
    assert rig.schedule.next_job()[0] == entry(B + "new")
    assert not rig.schedule.demand.has(B + "new")  # the count beside the queue follows it
