"""Readers' leases across a restart and in status (s3cache.policy.leases), pure: ``snapshot`` rows a
daemon saves and ``restore`` on the next start, ``holders`` and ``lease_budget``. What the daemon relies
on: a restarted daemon holds the same files for the rest of their leases, and a state file it cannot
trust (expired, from another clock, malformed) restores nothing wrong."""

from __future__ import annotations

import pytest

from s3cache.policy.leases import LEASE_SHARE, Leases, lease_budget


def test_the_budget_is_a_share_of_the_smaller_of_max_size_and_the_filesystem():
    assert LEASE_SHARE == 32
    assert lease_budget(3200, 6400) == 100 and lease_budget(6400, 3200) == 100
    assert lease_budget(3231, 10**9) == 100  # whole bytes, rounded down


def readers() -> Leases:
    le = Leases(lease=10.0, budget=10**6)
    le.saw("1:10", "a", 100, 1.0)
    le.saw("1:10", "b", 200, 2.0)
    le.saw("1:10", "c", 300, 3.0)
    le.saw("2:20", "x", 50, 4.0)
    return le


def test_a_restarted_daemon_holds_the_same_files_for_the_rest_of_their_leases():
    before = readers()
    rows = before.snapshot(5.0)
    assert sorted(map(tuple, rows)) == [("1:10", "a", 100, 1.0, 1), ("1:10", "b", 200, 2.0, 2),
                                        ("1:10", "c", 300, 3.0, 3), ("2:20", "x", 50, 4.0, 4)]
    after = Leases(lease=10.0, budget=10**6)
    assert after.restore(rows, 5.0) == 4
    assert after.held(5.0) == before.held(5.0) == {"a", "b", "c", "x"}
    assert after.holders(5.0) == 2 and after.snapshot(5.0) == rows
    assert after.held(12.5) == {"c", "x"}  # each keeps only what was left of its lease
    assert after.held(14.0) == set() and after.holders(14.0) == 0


def test_snapshot_and_holders_leave_out_what_has_expired():
    le = readers()
    assert [r[1] for r in le.snapshot(11.5)] == ["b", "c", "x"]
    assert le.snapshot(13.0) == [["2:20", "x", 50, 4.0, 4]]
    assert le.holders(13.0) == 1 and le.holders(13.9) == 1 and le.holders(14.0) == 0


def test_a_file_resolved_after_the_restart_is_the_readers_newest():
    le = Leases(lease=10.0, budget=0, min_files=2)
    assert le.restore([["r", "a", 1, 1.0, 7], ["r", "b", 1, 2.0, 9]], 3.0) == 2
    assert le.held(3.0) == {"a", "b"}
    le.saw("r", "c", 1, 3.0)  # takes a ticket after every restored place
    assert le.held(3.0) == {"b", "c"}
    assert le.ticket() == 11


def test_rows_are_restored_in_the_readers_order_whatever_order_they_are_in():
    le = Leases(lease=10.0, budget=0, min_files=1)
    le.restore([["r", "new", 1, 1.0, 5], ["r", "old", 1, 2.0, 3]], 3.0)  # newer by place, not by time
    assert le.held(3.0) == {"new"}


def test_a_uri_listed_twice_counts_its_bytes_once():
    le = Leases(lease=10.0, budget=200, min_files=1)
    assert le.restore([["r", "a", 100, 1.0, 1], ["r", "a", 50, 1.5, 2]], 2.0) == 2
    le.saw("r", "b", 100, 2.0)  # 150 bytes with a at 50: within the budget, so a stays
    assert le.held(2.0) == {"a", "b"}


@pytest.mark.parametrize("when, kept", [(5.0, True), (5, True), (0.0001, True), (0.0, False), (-3.0, False),
                                        (5.0001, False)])
def test_only_rows_within_their_lease_on_this_clock_are_restored(when, kept):
    le = Leases(lease=5.0, budget=10**6)
    assert le.restore([["r", "a", 1, when, 1]], 5.0) == int(kept)
    assert le.held(5.0) == ({"a"} if kept else set())


@pytest.mark.parametrize("row", [
    ["r", "a", 1, 4.0],  # short
    ["r", "a", 1, 4.0, 1, 0],  # long
    ("r", "a", 1, 4.0, 1),  # not a list
    [1, "a", 1, 4.0, 1],  # reader
    ["r", None, 1, 4.0, 1],  # uri
    ["r", "a", 1.0, 4.0, 1],  # size not an int
    ["r", "a", True, 4.0, 1],
    ["r", "a", -1, 4.0, 1],
    ["r", "a", 1, "4.0", 1],  # when
    ["r", "a", 1, None, 1],
    ["r", "a", 1, 4.0, 1.0],  # place
    ["r", "a", 1, 4.0, True],
    ["r", "a", 1, 4.0, None],
])
def test_a_malformed_row_is_dropped_and_the_others_kept(row):
    le = Leases(lease=10.0, budget=10**6)
    assert le.restore([row, ["r", "b", 0, 4.0, 2]], 5.0) == 1
    assert le.held(5.0) == {"b"} and le.snapshot(5.0) == [["r", "b", 0, 4.0, 2]]


@pytest.mark.parametrize("rows", [None, {"r": []}, "rows", 3])
def test_a_state_that_is_not_a_list_of_rows_restores_nothing(rows):
    le = Leases(lease=10.0, budget=10**6)
    assert le.restore(rows, 5.0) == 0 and le.held(5.0) == set() and le.snapshot(5.0) == []
