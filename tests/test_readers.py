"""The readers part (s3cache/readers.py) with a real space, schedule and cache dir, and real socket
connections: wants, answers pushed to waiters, leases of files used early, hit and miss counts."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest
from parts import Rig, catalog, control_connection, entry

B = "s3://bkt/"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    yield r
    r.close()


@pytest.fixture
def conn(tmp_path):
    with control_connection(tmp_path) as pair:
        yield pair


def test_a_want_for_a_missing_object_queues_it_first_and_the_publish_answers_the_waiter(rig, conn):
    c, replies = conn
    rig.install(catalog(entry(B + "a", 3), entry(B + "b", 3)))
    results = rig.readers.want(c, "r1", [B + "b"], [])
    assert results == [{"uri": B + "b", "state": "pending"}]
    assert rig.readers.misses == 1 and rig.readers.is_waited(B + "b")
    assert rig.schedule.next_job() == (entry(B + "b", 3), True)
    rec = rig.cached(B + "b", b"bbb")
    with rig.cond:
        rig.readers.landed([(B + "b", rec)], time.time())
    assert json.loads(replies.readline()) == {"event": "ready", "uri": B + "b", "path": rec.path}
    assert not rig.readers.is_waited(B + "b") and rig.readers.wait_seconds > 0
    assert rig.space.ready[B + "b"].last_used > 0  # the waiter is about to open it: leased now


def test_a_want_for_a_ready_object_answers_at_once_unless_its_file_is_gone(rig, conn):
    c, _ = conn
    rec = rig.cached(B + "a", b"a")
    assert rig.readers.want(c, "r1", [B + "a"]) == [{"uri": B + "a", "state": "ready", "path": rec.path}]
    os.unlink(rig.store.layout.abspath(rec.path))
    assert rig.readers.want(c, "r1", [B + "a"])[0]["state"] == "pending"
    assert not rig.space.is_ready(B + "a") and list(rig.schedule.demand) == [entry(B + "a")]


def test_an_invalid_uri_is_answered_as_invalid(rig, conn):
    c, _ = conn
    [res] = rig.readers.want(c, "r1", ["http://bkt/x"])
    assert res["state"] == "invalid" and res["message"]


def test_a_want_for_an_object_being_prefetched_promotes_that_fetch(rig, conn):
    c, _ = conn
    rig.install(catalog(entry(B + "a", 1)))
    assert rig.schedule.next_job() == (entry(B + "a", 1), False)
    rig.readers.want(c, "r1", [B + "a"])
    assert rig.promoted == [B + "a"] and not rig.schedule.demand


def test_a_failure_is_pushed_to_every_waiter(rig, conn):
    c, replies = conn
    rig.readers.want(c, "r1", [B + "x"])
    with rig.cond:
        rig.readers.failed(B + "x", "NoSuchKey", "gone")
    assert json.loads(replies.readline()) == {"event": "failed", "uri": B + "x", "code": "NoSuchKey",
                                              "message": "gone"}
    assert not rig.readers.is_waited(B + "x")


def test_a_closed_connection_waits_on_nothing(rig, conn):
    c, _ = conn
    rig.readers.want(c, "r1", [B + "x", B + "y"])
    rig.readers.closed(c)
    assert rig.readers.waiters == {}


def test_a_note_for_a_file_renamed_but_not_yet_ready_starts_its_lease_when_it_becomes_ready(rig):
    rig.install(catalog(entry(B + "a", 1)))
    rig.schedule.next_job()  # fetching
    before = time.time()
    rig.notes.append(("r1", "w", B + "a"))
    with rig.cond:
        rig.readers.drain()
    rec = rig.cached(B + "a", b"a")
    with rig.cond:
        rig.readers.landed([(B + "a", replace(rec, last_used=0.0))], time.time() + 100)
    assert before <= rig.space.ready[B + "a"].last_used <= time.time()


def test_hits_and_misses_are_counted_per_epoch_of_each_reader(rig, conn):
    c, _ = conn
    u = [f"{B}{i}" for i in range(6)]
    rig.install(catalog(*(entry(x, 1) for x in u)))
    for x in u:
        rig.cached(x, b"x")
    rig.notes.extend(("r1", "h", x) for x in u)  # epoch 0: all hits
    rig.notes.append(("r1", "h", u[0]))  # wrapped: epoch 1
    with rig.cond:
        rig.readers.drain()
    rig.readers.want(c, "r1", [B + "notlisted"])
    with rig.cond:
        st = rig.readers.status()
    assert st["readers"] == 1 and (st["hits"], st["misses"]) == (7, 1)
    assert st["epochs"] == [{"epoch": 0, "hits": 6, "misses": 0, "hit_rate": 1.0},
                            {"epoch": 1, "hits": 1, "misses": 1, "hit_rate": 0.5}]


def test_a_want_for_a_permanently_failed_object_is_answered_at_once_without_a_download(rig, conn):
    """Issue 17 item 16: WrongChecksum fails at once; NoSuchKey is looked at once more; transient
    failures are fetched again at once."""
    c, _ = conn
    with rig.cond:
        rig.schedule.fail(B + "bad", "WrongChecksum", "sha256 is not the object's")
        rig.schedule.fail(B + "gone", "NoSuchKey", "no such key")
        rig.schedule.fail(B + "down", "ServiceUnavailable", "503")
    res = rig.readers.want(c, "r1", [B + "bad", B + "gone", B + "down"])
    assert res[0] == {"uri": B + "bad", "state": "failed", "code": "WrongChecksum",
                      "message": "sha256 is not the object's"}
    assert [r["state"] for r in res[1:]] == ["pending", "pending"]
    assert [e.uri for e in rig.schedule.demand] == [B + "gone", B + "down"]
    assert not rig.readers.is_waited(B + "bad") and B + "bad" in rig.schedule.failed


def test_more_ahead_hints_than_allowed_are_refused_and_change_nothing(rig, conn):
    from s3cache.daemon.readers import MAX_AHEAD
    from s3cache.errors import RequestTooLarge

    c, _ = conn
    with pytest.raises(RequestTooLarge, match=f"at most {MAX_AHEAD}"):
        rig.readers.want(c, "r1", [B + "x"], [f"{B}h{i}" for i in range(MAX_AHEAD + 1)])
    assert not rig.schedule.demand and not rig.readers.waiters
    rig.readers.want(c, "r1", [B + "x"], [f"{B}h{i}" for i in range(MAX_AHEAD)])
    assert len(rig.schedule.demand) == MAX_AHEAD + 1


def test_a_wait_that_ends_with_the_readers_connection_still_counts(rig, conn):
    """Issue 19: wait_seconds stayed 0 after a reader waited and timed out (its connection closed)."""
    c, _ = conn
    rig.readers.want(c, "r1", [B + "x"])
    with rig.cond:
        during = rig.readers.status()
    assert during["waiting"] == 1 and during["wait_seconds"] > 0  # a wait going on counts already
    rig.readers.closed(c)
    assert rig.readers.wait_seconds >= during["wait_seconds"] > 0
    with rig.cond:
        after = rig.readers.status()
    assert after["waiting"] == 0 and after["wait_seconds"] == rig.readers.wait_seconds


def test_spoofed_notes_cost_bounded_state(rig):
    """Issue 18 item 6: invalid URIs skipped before any lookup, readers and epochs capped."""
    from s3cache.daemon.readers import EPOCHS_KEPT, MAX_READERS

    u = [f"{B}{i}" for i in range(100)]
    rig.install(catalog(*(entry(x, 1) for x in u)))
    rig.notes.extend(("r1", "h", u[i]) for i in [0, 50] * 500)  # every jump back to 0 is a new epoch
    rig.notes.extend((f"fake-{i}", "h", u[0]) for i in range(5 * MAX_READERS))
    rig.notes.extend(("r2", "h", bad) for bad in ["", "s3://", "x" * 70_000, "s3://b/" + "k" * 2000, "s3://B_ad/k"])
    with rig.cond:
        rig.readers.drain()
        st = rig.readers.status()
    assert st["readers"] <= MAX_READERS and len(rig.readers.epochs) <= EPOCHS_KEPT
    assert len(st["epochs"]) <= EPOCHS_KEPT and st["epochs"][-1]["epoch"] >= 400  # the recent ones
    assert st["notes_rejected"] == 5


def test_notes_for_files_nobody_fetches_or_awaits_keep_nothing_and_holders_per_file_are_capped(rig, conn):
    """Notes come from any group member under any holder: a note for an object neither fetching nor
    waited on leaves no awaited lease behind, and one object keeps at most MAX_AWAITING holders."""
    from s3cache.daemon.leasing import MAX_AWAITING

    c, _ = conn
    rig.install(catalog(entry(B + "a", 3)))
    rig.notes.extend((f"r/0:{i}", "h", f"{B}never/{i}") for i in range(5000))
    with rig.cond:
        rig.readers.drain()
    assert rig.space._awaited == {}
    rig.readers.want(c, "r/0:1", [B + "a"])  # now it is waited on: holders are kept, up to the cap
    rig.notes.extend((f"r/0:{i}", "h", B + "a") for i in range(4 * MAX_AWAITING))
    with rig.cond:
        rig.readers.drain()
    assert 0 < len(rig.space._awaited[B + "a"]) <= MAX_AWAITING
