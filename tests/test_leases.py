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
    le = Leases(lease=10.0, budget=150, min_files=1)
    assert le.restore([["r", "a", 100, 1.0, 1], ["r", "a", 50, 1.5, 2]], 2.0) == 2
    le.saw("r", "b", 100, 2.0)  # 150 bytes with a at 50: b alone is below the budget, so a stays
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


# -- what a lease holds ----------------------------------------------------------------------------


def test_each_reader_holds_exactly_its_min_files_newest_beyond_the_budget():
    le = Leases(lease=10.0, budget=0, min_files=2)
    for t, uri in enumerate("abcd"):
        le.saw("r", uri, 1, float(t))
    assert le.held(4.0) == {"c", "d"}
    assert [row[1] for row in le.snapshot(4.0)] == ["c", "d"]  # the rest are no longer kept at all


def test_a_file_leased_exactly_lease_seconds_ago_is_free():
    le = Leases(lease=10.0, budget=10**6, min_files=2)
    le.saw("r", "old", 1, 0.0)
    le.saw("r", "new", 1, 5.0)
    assert le.held(9.99) == {"old", "new"} and le.held(10.0) == {"new"}
    assert le.snapshot(10.0) == [["r", "new", 1, 5.0, 2]]
    assert le.held(15.0) == set() and le.holders(15.0) == 0


def test_a_late_lease_that_is_still_fresh_is_held_behind_an_expired_newer_place():
    le = Leases(lease=10.0, budget=10**6, min_files=2)
    late = le.ticket()  # the reader took y first; it became ready (and leased) only later
    le.saw("r", "a", 1, 1.0)
    le.saw("r", "y", 1, 8.0, place=late)
    assert le.held(11.5) == {"y"}  # a (the newest place) expired; y, behind it, did not


def test_a_reader_gone_quiet_no_longer_takes_a_share_of_the_budget():
    le = Leases(lease=10.0, budget=100, min_files=1)
    le.saw("gone", "g", 40, 0.0)
    for t, uri in enumerate(["b1", "b2", "b3"]):
        le.saw("busy", uri, 40, 5.0 + t)
    changes = le.changes
    assert le.held(10.0) == {"b2", "b3"}  # g's lease ended just now: the whole budget is busy's
    assert le.changes > changes and le.holders(10.0) == 1  # the quiet reader was forgotten


def test_the_budget_is_split_between_the_readers_active_now():
    le = Leases(lease=10.0, budget=100, min_files=1)
    for reader in ("p", "q"):
        for t, uri in enumerate(["1", "2", "3"]):
            le.saw(reader, reader + uri, 40, float(t))
    assert le.held(3.0) == {"p3", "q3"}  # 50 bytes each: the newest file, then 80 is past the share
    le.forget("q")
    assert le.held(3.0) == {"p3", "p2"}


def test_a_file_seen_again_counts_its_bytes_once_and_moves_to_the_newest():
    le = Leases(lease=10.0, budget=40, min_files=1)
    le.saw("r", "a", 20, 101.0)
    le.saw("r", "b", 20, 102.0)
    le.saw("r", "a", 20, 103.0)  # 40 bytes, not 60: b stays kept (40 - 20 is below the budget)
    assert [row[1] for row in le.snapshot(103.0)] == ["b", "a"]
    le.saw("r", "c", 20, 104.0)  # 60 bytes: b, the oldest, goes (60 - 20 is not below 40)
    assert [row[1] for row in le.snapshot(104.0)] == ["a", "c"]
    le = Leases(lease=10.0, budget=35, min_files=1)
    for t, (uri, size) in enumerate([("a", 30), ("b", 10), ("c", 10), ("a", 30)]):
        le.saw("r", uri, size, 100.0 + t)  # 50 bytes, a again still 50: b goes (40 is not below 35), c stays
    assert [row[1] for row in le.snapshot(104.0)] == ["c", "a"]


def test_the_first_files_of_a_reader_count_from_zero_bytes():
    le = Leases(lease=10.0, budget=21, min_files=1)
    le.saw("r", "a", 20, 0.0)
    le.saw("r", "b", 20, 1.0)  # 40 - 20 = 20 is below 21: a stays
    assert [row[1] for row in le.snapshot(1.0)] == ["a", "b"]


def test_a_reader_forgotten_and_back_counts_its_bytes_afresh():
    le = Leases(lease=10.0, budget=9, min_files=1)
    le.saw("r", "a", 8, 0.0)
    le.forget("r")
    le.forget("nobody")  # forgetting a reader that holds nothing is fine
    le.saw("r", "b", 8, 1.0)
    le.saw("r", "c", 1, 2.0)  # 9 bytes: 9 - 8 is below 9, b stays
    assert [row[1] for row in le.snapshot(2.0)] == ["b", "c"]


def test_a_fresh_table_has_nothing_to_save():
    assert Leases(lease=10.0, budget=1).changes == 0


def test_a_reader_keeps_old_files_while_they_fit_the_budget_and_not_past_their_lease():
    le = Leases(lease=10.0, budget=60, min_files=1)
    for t, uri in enumerate("abc"):
        le.saw("r", uri, 20, 100.0 + t)  # 60 bytes: without a, 40 < 60, so all three stay
    assert [row[1] for row in le.snapshot(102.0)] == ["a", "b", "c"]
    le.saw("r", "d", 20, 103.0)  # 80: a goes (60 is not below 60), then b stays
    assert [row[1] for row in le.snapshot(103.0)] == ["b", "c", "d"]
    le.saw("r", "e", 20, 104.0)  # 80 again: b goes
    assert [row[1] for row in le.snapshot(104.0)] == ["c", "d", "e"]
    le.saw("r", "f", 0, 112.0)  # c's lease ended exactly now: it goes though the bytes fit; d's has not
    assert [row[1] for row in le.snapshot(112.0)] == ["d", "e", "f"]


# -- each thread's newest files ------------------------------------------------------------------


def test_each_threads_two_newest_files_are_held_for_recent_seconds_whatever_the_budget():
    le = Leases(lease=600.0, budget=0, min_files=2, recent=5.0)
    le.saw("1:10|t1", "a", 1, 100.0)
    le.saw("1:10|t1", "b", 1, 100.0)
    le.saw("1:10|t2", "c", 1, 100.0)
    le.saw("1:10|t2", "d", 1, 100.0)
    le.saw("1:10|t1", "e", 1, 101.0)
    assert le.held(101.0) == {"b", "c", "d", "e"}  # the process's two newest, and each thread's two
    assert le.held(104.99) == {"b", "c", "d", "e"}
    assert le.held(105.0) == {"d", "e"} == le.held(106.0)  # t1's b after ``recent``; d, e are newest
    assert le.holders(106.0) == 1  # threads are one holder: the process


def test_a_thread_noting_the_same_file_twice_keeps_its_previous_file_too():
    le = Leases(lease=600.0, budget=0, min_files=2, recent=5.0)
    le.saw("1:10|t1", "a", 1, 0.0)
    le.saw("1:10|t1", "b", 1, 0.0)
    le.saw("1:10|t1", "b", 1, 0.0)  # its want, then its use
    le.saw("1:10|t2", "c", 1, 0.0)
    assert le.held(1.0) == {"a", "b", "c"}


def test_thread_files_are_kept_only_with_recent_set_and_never_past_the_lease():
    no_recent = Leases(lease=600.0, budget=0, min_files=1)
    capped = Leases(lease=2.0, budget=0, min_files=1, recent=5.0)
    one = Leases(lease=600.0, budget=0, min_files=1, recent=1.0)
    assert capped.recent == 2.0
    for le in (no_recent, capped, one):
        le.saw("1:10|t1", "a", 1, 0.0)
        le.saw("1:10|t2", "b", 1, 0.0)
    assert no_recent.held(0.5) == {"b"} and capped.held(1.0) == {"a", "b"}
    assert one.held(0.5) == {"a", "b"} and one.held(1.0) == {"b"}
    capped.saw("1:10|t2", "c", 1, 1.5)  # keeps the process active
    assert capped.held(2.5) == {"c"}


def test_a_process_keeps_its_most_recently_active_threads_files_up_to_max_threads():
    from s3cache.policy.leases import MAX_THREADS

    le = Leases(lease=600.0, budget=0, min_files=1, recent=100.0)
    le.saw("1:10|t0", "f0", 1, 0.0)
    le.saw("1:10|t1", "f1", 1, 0.0)
    le.saw("1:10|t0", "f0", 1, 0.0)  # t0 active again: t1 is now the least recently active
    for i in range(2, MAX_THREADS + 1):
        le.saw(f"1:10|t{i}", f"f{i}", 1, 0.0)
    held = le.held(1.0)
    assert "f1" not in held and "f0" in held and len(held) == MAX_THREADS


def test_forgetting_a_process_or_everything_drops_its_threads_files_too():
    le = Leases(lease=600.0, budget=0, min_files=1, recent=100.0)
    le.saw("1:10|t1", "a", 1, 0.0)
    le.saw("1:10|t2", "b", 1, 0.0)
    le.saw("2:20|t1", "c", 1, 0.0)
    le.saw("2:20|t2", "d", 1, 0.0)
    changes = le.changes
    le.forget("1:10")
    assert le.held(1.0) == {"c", "d"} and le.changes == changes + 1
    le.saw("1:10|t1", "e", 1, 1.0)
    assert le.held(1.0) == {"c", "d", "e"}
    le.forget()
    assert le.held(1.0) == set() and le.snapshot(1.0) == [] and le.changes == changes + 3
    le.saw("3:30", "x", 5, 2.0)
    le.saw("3:30", "y", 5, 2.0)
    assert le.held(2.0) == {"y"}  # bytes counted afresh after forget: nothing left over


# -- one uid's cap ---------------------------------------------------------------------------------


def uid_leases(**kw) -> Leases:
    le = Leases(lease=600.0, budget=10**6, min_files=1, **kw)
    for holder in ("5:1", "5:2", "6:1"):
        le.saw(holder, holder + "/old", 60, 0.0)
        le.saw(holder, holder + "/new", 60, 1.0)
    return le


def test_the_processes_of_one_uid_hold_about_uid_cap_newest_first_each_in_turn():
    le = uid_leases(uid_cap=100)
    # uid 5: each process's newest in turn; the second crosses the cap and is still held, then no more
    assert le.held(2.0) == {"5:1/new", "5:2/new", "6:1/new", "6:1/old"}
    assert uid_leases(uid_cap=None).held(2.0) == {h + f for h in ("5:1", "5:2", "6:1") for f in ("/old", "/new")}


def test_a_file_two_processes_of_one_uid_hold_counts_once_against_its_cap():
    # Found by the model's long run: two processes of uid 5 both hold "shared" (700 bytes of a 1000-byte
    # cap); counted twice, the uid looked full and the first process's older file lost its lease.
    le = Leases(lease=600.0, budget=62, min_files=2, uid_cap=1000)
    le.saw("5:1", "older", 700, 0.0)
    le.saw("5:2", "shared", 700, 1.0)
    le.saw("5:1", "shared", 700, 2.0)
    assert le.held(3.0) == {"shared", "older"}


def test_a_trusted_uid_is_not_capped():
    le = uid_leases(uid_cap=100, uncapped={"5"})
    assert le.held(2.0) == {"5:1/new", "5:2/new", "5:1/old", "5:2/old", "6:1/new", "6:1/old"}


def test_a_uid_always_holds_min_files_however_small_its_cap():
    le = Leases(lease=600.0, budget=10**6, min_files=2, uid_cap=10)
    for uri in ("a", "b", "c"):
        le.saw("7:1", uri, 60, 0.0)
    assert le.held(1.0) == {"b", "c"}


def test_holders_named_without_a_uid_are_each_their_own():
    le = Leases(lease=600.0, budget=10**6, min_files=1, uid_cap=50)
    for holder in ("p", "q"):
        le.saw(holder, holder + "1", 60, 0.0)
        le.saw(holder, holder + "2", 60, 1.0)
    assert le.held(2.0) == {"p2", "q2"}


def test_restored_leases_count_their_bytes_against_the_readers_budget():
    rows = [["r", "a", 40, 1.0, 1], ["r", "b", 40, 1.5, 2]]
    tight = Leases(lease=10.0, budget=80, min_files=1)
    tight.restore(rows, 2.0)
    tight.saw("r", "c", 40, 2.0)  # 120 bytes: without a, 80 is not below the budget, so a goes
    assert [row[1] for row in tight.snapshot(2.0)] == ["b", "c"]
    roomy = Leases(lease=10.0, budget=81, min_files=1)
    roomy.restore(rows, 2.0)
    roomy.saw("r", "c", 40, 2.0)  # 80 is below 81: a stays
    assert [row[1] for row in roomy.snapshot(2.0)] == ["a", "b", "c"]


def test_holders_count_by_the_time_of_each_lease_not_its_place():
    le = Leases(lease=10.0, budget=10**6)
    le.saw("r", "a", 1, 100.0)
    assert le.holders(105.0) == 1 and le.holders(110.0) == 0


def test_a_file_two_threads_hold_counts_once_against_the_uid_cap():
    le = Leases(lease=600.0, budget=0, min_files=1, uid_cap=100, recent=100.0)
    le.saw("5:1|t1", "x", 60, 0.0)
    le.saw("5:1|t2", "x", 60, 0.0)
    le.saw("5:1|t3", "v", 30, 0.0)
    le.saw("5:1|t4", "w", 10, 0.0)
    assert le.held(1.0) == {"w", "x", "v"}  # 10 + 60 + 30: v fits under the cap once x counts once


def test_the_uid_cap_stops_once_reached_exactly():
    le = uid_leases(uid_cap=120)
    assert le.held(2.0) == {"5:1/new", "5:2/new", "6:1/new", "6:1/old"}


def test_processes_of_one_uid_holding_different_numbers_of_files_take_turns():
    le = Leases(lease=600.0, budget=10**6, min_files=1, uid_cap=10**6)
    for t, uri in enumerate(["a1", "a2", "a3"]):
        le.saw("5:1", uri, 1, float(t))
    le.saw("5:2", "b1", 1, 0.0)
    assert le.held(3.0) == {"a1", "a2", "a3", "b1"}


def test_a_thread_resolving_a_file_again_holds_it_for_recent_seconds_from_then():
    # One of 16 threads resolves a, b, then a again 1.5 s later; the other threads' files push a out of
    # the process's newest. Kept at its first note, a's hold ended at 2.0, 0.5 s after its second
    # resolve, and eviction took it before the thread opened it (FileNotFoundError in test_resolve).
    le = Leases(lease=2.0, budget=0, min_files=2, recent=2.0)
    le.saw("1:10|t1", "a", 1, 0.0)
    le.saw("1:10|t1", "b", 1, 0.5)
    le.saw("1:10|t1", "a", 1, 1.5)
    for i in range(4):
        le.saw(f"1:10|o{i}", f"o{i}", 1, 1.6)
    assert {"a", "b"} <= le.held(2.1)  # b: its own 2 s run to 2.5; a: renewed at 1.5, to 3.5
    assert "a" in le.held(3.4) and "b" not in le.held(3.4)
    assert "a" not in le.held(3.5)  # never past ``recent`` after its latest note


def test_a_file_a_thread_took_before_it_landed_does_not_push_out_the_files_it_took_since():
    # A thread's lookup found x renamed but not yet committed (its note waits for the commit, with the
    # place it took then), then it resolved y and wants z. x and z land after: x, older in the thread's
    # order, must not push out y, the file the thread was just handed (it re-opens it): the daemon
    # run of test_resolve's 16 threads lost y so.
    le = Leases(lease=2.0, budget=0, min_files=2, recent=2.0)
    x_place = le.ticket()  # taken when the note on x reached the daemon (Leasing._await)
    le.saw("1:10|t1", "y", 1, 0.1)
    z_place = le.ticket()  # its want
    le.saw("1:10|t1", "x", 1, 0.2, place=x_place)  # x lands
    le.saw("1:10|t1", "z", 1, 0.3, place=z_place)  # z lands
    for i in range(4):  # the other threads' files: y and z are no longer the process's newest
        le.saw(f"1:10|o{i}", f"o{i}", 1, 0.4)
    held = le.held(0.5)
    assert {"y", "z"} <= held and "x" not in held
