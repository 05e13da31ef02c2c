"""The eviction policy's edges (s3cache.policy.evict and .tracker), pure: where the reader tracker places readers
(steps, wraps, announcements, a reloaded manifest, its bound on readers), the boundaries of
``choose_victims`` (the readahead window, equal distances, ties), the readahead window's size and
``next_prefetch``'s answer when nothing is wanted. What the daemon relies on when it evicts."""

from __future__ import annotations

from s3cache.manifest.jobs import Jobs
from s3cache.policy.evict import (
    Future,
    Resident,
    choose_victims,
    leased,
    next_prefetch,
    readahead_files,
    unread_positions,
)
from s3cache.policy.order import Announcement, ListMap, permutation
from s3cache.policy.tracker import ReaderTracker


def res(name, pos=None, used=0.0, fetched=0.0, size=1):
    return Resident(name, size, used, fetched, pos)


def pick(residents, **kw):
    args = dict(need=1, extra=0, readers=[], n=10, target_distance=None, demand=False, now=100.0, lease=10.0)
    args.update(kw)
    v = choose_victims(residents, **args)
    return None if v is None else [r.uri for r in v]


def walk(t: ReaderTracker, reader: str, positions, n: int, start: float = 0.0) -> int:
    epoch = 0
    for i, p in enumerate(positions):
        epoch = t.saw(reader, p, n, start + i)
    return epoch


# -- the reader tracker ----------------------------------------------------------------------------


def test_steps_of_up_to_stride_make_a_reader_ordered_and_a_longer_one_starts_over():
    t = ReaderTracker(stride=4)
    walk(t, "r", [0, 4, 8, 12], 100)  # three steps of exactly the stride
    assert t.positions(100, 4.0) == [13]
    walk(t, "r", [17], 100, 4.0)  # a step of 5: not in order any more
    assert t.positions(100, 5.0) == []
    walk(t, "r", [18, 19, 19], 100, 6.0)  # two steps since the long one; a file noted twice is no step
    assert t.positions(100, 9.0) == []
    walk(t, "r", [20], 100, 9.0)  # ... and does not reset the count either
    assert t.positions(100, 10.0) == [21]


def test_the_default_stride_is_four():
    t = ReaderTracker()
    walk(t, "four", [0, 4, 8, 12], 100)
    walk(t, "five", [0, 5, 10, 15], 100)
    assert t.positions(100, 4.0) == [13]


def test_a_small_step_back_is_notes_out_of_order_and_leaves_the_reader_where_it_was():
    t = ReaderTracker(stride=4)
    walk(t, "r", [10, 11, 12, 13], 100)
    assert t.saw("r", 11, 100, 4.0) == 0  # a note that arrived late
    assert t.positions(100, 4.0) == [14] and t.current() == {13}


def test_wrapping_to_the_top_is_the_next_epoch_each_time_and_a_repeat_is_not():
    t = ReaderTracker(stride=4)
    assert walk(t, "r", [6, 7, 8, 9, 9], 10) == 0
    assert walk(t, "r", [0, 1, 2, 3, 3], 10, 5.0) == 1
    assert walk(t, "r", [7, 8, 9, 2], 10, 10.0) == 2  # started over near the top: a new epoch too
    assert walk(t, "r", [8, 9, 4], 10, 14.0) == 2  # back to the middle: not the top
    assert t.epoch_of("r") == 2 and t.epoch_of("nobody") == 0


def test_a_reader_at_position_zero_is_reading_it():
    t = ReaderTracker()
    t.saw("r", 0, 10, 0.0)
    assert t.current() == {0} and t.where() == [0]


def test_a_reader_past_the_end_of_a_shrunken_manifest_is_not_in_order():
    t = ReaderTracker(stride=4)
    walk(t, "r", [6, 7, 8, 9], 10)
    assert t.positions(10, 4.0) == [0]
    assert t.positions(9, 4.0) == [] and t.positions(0, 4.0) == []


def test_jobs_of_another_manifest_size_are_not_used():
    t = ReaderTracker(stride=4)
    t.jobs = Jobs(["a", "b"], [0, 4], 8)
    walk(t, "r", [0, 1, 2, 3], 8)
    assert t.positions(8, 4.0) == [0]  # wraps within job a
    assert t.positions(12, 4.0) == [4]  # a 12-entry manifest is not what the jobs describe


def test_a_reader_that_announced_its_order_is_placed_in_it_and_forgotten_when_silent():
    t = ReaderTracker(idle=10.0)
    order = Announcement(3, 2, ListMap(10))
    t.announce("r", order, now=0.0)
    assert t.where() == [] and t.current() == set() and t.positions(10, 0.0) == []
    assert t.epoch_of("r") == 2
    fut = t.future(10, now=5.0)
    assert fut and fut.announced == [order] and fut.distance(permutation(10, 3, 2)[0]) == 0
    assert t.saw("r", permutation(10, 3, 2)[0], 10, 6.0) == 2 and t.current() == {permutation(10, 3, 2)[0]}
    assert t.future(10, now=16.0).announced == [order]  # its note kept it alive
    assert not t.future(10, now=16.01) and len(t) == 0


def test_announcing_keeps_where_a_reader_already_is_and_refreshes_it():
    t = ReaderTracker(idle=10.0)
    t.saw("r", 4, 10, 0.0)
    order = Announcement(1, 0, ListMap(10))
    t.announce("r", order, now=8.0)
    assert t.current() == {4} and t.future(10, now=17.0).announced == [order]
    assert t.epoch_of("r") == 0
    assert not t.future(10, now=18.01) and len(t) == 0  # silent for idle seconds since it announced


def test_an_idle_reader_is_forgotten_only_after_idle_seconds():
    t = ReaderTracker(idle=10.0)
    t.saw("r", 1, 10, 0.0)
    t.positions(10, 10.0)
    assert len(t) == 1
    t.positions(10, 10.01)
    assert len(t) == 0


def test_past_the_limit_the_longest_silent_readers_go_down_to_three_quarters():
    t = ReaderTracker()
    for i in range(8):
        t.saw(f"r{i}", i, 100, float(10 - i))  # r7 spoke first, r0 last
    t.make_room(8)
    assert len(t) == 8
    t.saw("r8", 8, 100, 0.5)
    t.make_room(8)
    assert sorted(t.ids()) == ["r0", "r1", "r2", "r3", "r4", "r5"]


def test_a_reloaded_manifest_moves_each_reader_and_its_announced_order():
    t = ReaderTracker(stride=4)
    walk(t, "kept", [0, 1, 2, 3], 10)
    walk(t, "gone", [4, 5, 6, 7], 10)
    walk(t, "zero", [8, 9, 0], 10)
    order = Announcement(5, 0, ListMap(10))
    t.announce("shuffled", order, now=4.0)
    moved = {3: 0, 0: 6}.get  # 3 is now 0, 0 is now 6; the rest left the manifest
    t.remap(moved)
    assert t.current() == {0, 6} and t.positions(10, 4.0) == [1]  # "gone" is no longer in order
    assert order.lists.position(3) == 0 and order.lists.position(0) == 6 and order.lists.position(1) is None
    walk(t, "gone", [2, 3, 4, 5], 10, 5.0)  # it steps in order again: three steps
    assert t.positions(10, 9.0) == [1, 6]


# -- choose_victims' boundaries ------------------------------------------------------------------


def test_a_prefetch_needed_exactly_the_window_away_evicts_nothing():
    rs = [res("far", 9, used=1.0)]
    fut = Future(10, [0])
    assert pick(rs, future=fut, target_distance=4, window=4) is None
    assert pick(rs, future=fut, target_distance=3, window=4) == ["far"]
    assert pick(rs, future=fut, target_distance=4, window=4, demand=True) == ["far"]


def test_a_file_needed_as_soon_as_the_one_to_fetch_is_not_evicted_for_it():
    fut = Future(10, [0])
    assert pick([res("p5", 5, used=1.0)], future=fut, target_distance=5) is None
    assert pick([res("p5", 5, used=1.0)], future=fut, target_distance=4) == ["p5"]


def test_an_unread_file_gives_way_only_to_an_earlier_entry():
    rs = [res("u5", 5)]
    assert pick(rs, target_distance=5) is None and pick(rs, target_distance=4) == ["u5"]


def test_files_with_the_same_age_go_in_the_order_given_without_comparing_them():
    rs = [res("t1", None, used=3.0), res("t2", None, used=3.0), res("c1", 1, used=3.0), res("c2", 2, used=3.0)]
    assert pick(rs, need=4, demand=True) == ["t1", "t2", "c1", "c2"]
    assert pick(rs, need=1, extra=1, demand=True) == ["t1", "t2"]


def test_when_the_manifest_is_empty_every_file_counts_as_not_in_it():
    rs = [res("old", 5, fetched=2.0), res("new", 3, fetched=1.0)]
    assert pick(rs, n=0, need=1) == ["new"]
    assert pick([res("x", 0, fetched=1.0)], n=1, need=1, target_distance=None) is None  # unread, n=1: kept


def test_a_future_over_an_empty_manifest_knows_nothing():
    assert not Future(0, [1, 2]) and Future(0, [1]).distance(0) is None and list(Future(0, [1]).upcoming()) == []


def test_a_lease_runs_lease_seconds_from_the_last_use_and_a_file_never_used_has_none():
    assert leased(res("a", 1, used=95.0), 100.0, 10.0) and not leased(res("a", 1, used=90.0), 100.0, 10.0)
    assert not leased(res("a", 1, used=0.0), 5.0, 10.0)


def test_unread_means_never_used_however_early_the_clock():
    assert unread_positions([res("a", 1, used=0.5), res("b", 2), res("c", None)]) == [2]


def test_the_readahead_window_in_files():
    assert readahead_files(1600, 1, 50) == 50  # bytes over a 1-byte mean: 50 files, under the cap of 100
    assert readahead_files(1600, 0, 50) == 50  # no sizes known yet: as if 1 byte
    assert readahead_files(16000, 10, 55) == 5 and isinstance(readahead_files(16000, 10, 55), int)
    assert readahead_files(16000, 10, 10**6, readahead_files=1) == 1  # files when given, even one
    cap = readahead_files(1650, 10, 10**6)
    assert cap == 10 and isinstance(cap, int)  # 165 files of cache, a sixteenth
    assert readahead_files(100, 10, 10**6) == 0


def test_next_prefetch_with_nothing_wanted_is_not_limited():
    fut = Future(10, [0])
    assert next_prefetch(fut, lambda p: False, lambda p: 1, window=3, free=0) == (None, False)
    assert next_prefetch(fut, lambda p: p == 5, lambda p: 1, window=3, free=0) == (None, True)


# -- jobs and announced orders ---------------------------------------------------------------------


def test_with_an_announced_reader_the_horizon_is_the_whole_manifest_not_one_job():
    jobs = Jobs(["a", "b"], [0, 5], 10)
    order = Announcement(2, 0, ListMap(10))
    fut = Future(10, [2], announced=[order], jobs=jobs)
    got = list(fut.upcoming())
    announced = [(k, p) for k, p in got if k < 10 and p == order.at(k)]
    assert sorted({k for k, _ in announced}) == list(range(10))  # the announced reader's whole epoch
    # b is read by nobody in order: its files come after the known needs (n + offset in b) unless announced sooner
    assert fut.distance(7) == min(order.distance(7), 10 + 7 - 5)


def test_a_future_in_manifest_order_walks_forward_from_each_reader_and_wraps():
    assert list(Future(10, [8]).upcoming())[:4] == [(0, 8), (1, 9), (2, 0), (3, 1)]


def test_a_future_with_jobs_and_no_reader_offers_nothing():
    assert list(Future(10, jobs=Jobs(["a", "b"], [0, 5], 10)).upcoming()) == []


def test_jobs_nobody_reads_come_after_the_readers_needs_one_file_of_each_in_turn():
    jobs = Jobs(["a", "b", "c"], [0, 3, 5], 8)  # a: 0-2 (read in order), b: 3-4, c: 5-7 (nobody)
    fut = Future(8, [1], jobs=jobs)
    assert list(fut.upcoming()) == [(0, 1), (1, 2), (2, 0), (8, 3), (8, 5), (9, 4), (9, 6), (10, 7)]
    assert [fut.distance(p) for p in (3, 4, 5, 7)] == [8, 9, 8, 10]  # n + the offset in its own job


def test_an_announced_reader_that_never_reads_a_file_leaves_the_in_order_readers_distance():
    share = Announcement(4, 0, ListMap.share(10, 0, 2))  # reads 0, 2, 4, 6, 8 only
    fut = Future(10, [0], announced=[share])
    assert fut.distance(3) == 3
    assert fut.distance(2) == min(2, share.distance(2))


def test_an_announced_readers_epoch_follows_its_order_into_the_next_epoch():
    t = ReaderTracker()
    order = Announcement(9, 4, ListMap(10), cursor=10)  # at the end of epoch 4
    t.announce("r", order, now=0.0)
    assert t.saw("r", permutation(10, 9, 5)[0], 10, 1.0) == 5  # began epoch 5 without announcing it
    assert t.epoch_of("r") == 5


def test_a_new_reader_starts_in_epoch_zero():
    assert ReaderTracker().saw("r", 5, 10, 0.0) == 0


def test_a_wrap_is_a_return_to_within_stride_of_the_top():
    t = ReaderTracker(stride=4)
    assert walk(t, "r", [13, 14, 15, 4], 20) == 0  # 4 files from the top: the middle, not a wrap
    assert walk(t, "q", [13, 14, 15, 3], 20) == 1


def test_a_step_of_exactly_stride_is_forward_and_a_longer_one_back_within_stride_is_not_a_move():
    t = ReaderTracker(stride=4)
    walk(t, "r", [0, 4], 8)  # 4 ahead (and 4 behind, around the end): forward
    assert t.current() == {4}
    walk(t, "q", [5, 1], 10)  # 6 ahead, 4 behind: a late note, not a move
    assert t.current() == {4, 5} and t.epoch_of("q") == 0


def test_a_readers_steps_count_within_its_own_job():
    t = ReaderTracker(stride=4)
    t.jobs = Jobs(["a", "b"], [0, 4], 8)
    assert walk(t, "r", [0, 1, 2, 3, 0], 8) == 1  # a's last file, then a's first: its next epoch
    assert t.positions(8, 5.0) == [1]
    fut = t.future(8, now=5.0)
    assert fut.distance(2) == 1 and fut.distance(6) == 8 + 6 - 4  # b is nobody's: after every need


def test_moving_into_another_job_starts_the_count_over():
    t = ReaderTracker(stride=2)
    t.jobs = Jobs(["a", "b"], [0, 6], 12)
    walk(t, "r", [6, 7, 8], 12)  # two steps in b
    walk(t, "r", [1, 2], 12, 3.0)  # into a: one step since
    assert t.positions(12, 5.0) == []
    walk(t, "s", [6, 5], 12)  # from b's first file to a's last: another job, not a step back
    assert 5 in t.current()


def test_a_jump_into_another_job_is_not_a_step_even_if_it_looks_like_one_around_the_job():
    t = ReaderTracker(stride=2)
    t.jobs = Jobs(["a", "b"], [0, 6], 12)
    walk(t, "r", [6, 7, 8, 3], 12)  # 3 is one past 8 around a 6-file job, but it is a's, not b's
    assert t.positions(12, 4.0) == []
