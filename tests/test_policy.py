"""The eviction policy and the simulator, pure (no daemon): fast, and exhaustive where it can be."""

from __future__ import annotations

from s3cache import simulate
from s3cache.evict import Resident, ReaderTracker, choose_victims


def res(name, pos=None, used=0.0, pinned=False, size=1):
    return Resident(name, size, used, 0.0, pos, pinned)


def pick(residents, **kw):
    args = dict(need=1, extra=0, readers=[], n=10, target_distance=None, demand=False, now=100.0, lease=10.0)
    args.update(kw)
    v = choose_victims(residents, **args)
    return None if v is None else [r.uri for r in v]


def test_never_evicted_pinned_leased_or_being_read():
    rs = [res("pinned", 1, pinned=True), res("leased", 2, used=95.0), res("reading", 3, used=50.0)]
    assert pick(rs, demand=True, protected={3}) is None
    assert pick(rs, demand=True) == ["reading"]


def test_files_outside_the_manifest_go_first_lru():
    rs = [res("m-read", 5, used=1.0), res("x-new", None, used=40.0), res("x-old", None, used=30.0)]
    assert pick(rs, need=2) == ["x-old", "x-new"]


def test_unread_prefetched_files_only_make_room_for_earlier_entries_or_waiting_readers():
    rs = [res("p2", 2), res("p5", 5)]
    assert pick(rs, target_distance=7) is None  # a later entry: prefetch pauses instead
    assert pick(rs, target_distance=3) == ["p5"]  # an earlier entry may take p5's place
    assert pick(rs, demand=True, target_distance=0) == ["p5"]


def test_with_readers_in_order_the_file_needed_furthest_away_goes():
    # reader's next position is 4 in a manifest of 10: file 3 (just read) is needed furthest away
    rs = [res("p3", 3, used=50.0), res("p6", 6), res("p1", 1, used=40.0)]
    assert pick(rs, readers=[4], target_distance=2) == ["p3"]
    assert pick(rs, readers=[4], target_distance=2, need=2) == ["p3", "p1"]
    # nothing is evicted for a file needed later than everything resident
    assert pick([res("p6", 6)], readers=[4], target_distance=5) is None


def test_watermark_extra_comes_only_from_files_with_no_known_future():
    rs = [res("x1", None, used=1.0), res("x2", None, used=2.0), res("p3", 3, used=50.0)]
    assert pick(rs, readers=[4], target_distance=0, need=1, extra=1) == ["x1", "x2"]
    assert pick([res("p3", 3, used=50.0), res("p2", 2, used=40.0)], readers=[4], target_distance=0,
                need=1, extra=5) == ["p3"]


def test_reader_tracker_orders_and_epochs():
    t = ReaderTracker(idle=100, stride=4)
    for i, p in enumerate([0, 1, 2]):
        t.saw("a", p, 10, float(i))
    assert t.positions(10, 3.0) == []  # two steps are not yet an order
    t.saw("a", 3, 10, 3.0)
    assert t.positions(10, 4.0) == [4] and t.current() == {3}
    for p in range(4, 10):
        t.saw("a", p, 10, 5.0)
    assert t.saw("a", 0, 10, 6.0) == 1  # wrapped: epoch 1
    for p in (7, 2, 9, 4):  # a shuffled reader is never taken as ordered
        t.saw("b", p, 10, 7.0)
    assert t.positions(10, 8.0) == [1]
    assert t.positions(10, 500.0) == []  # idle readers are forgotten


def test_simulated_cyclic_scan_reaches_the_belady_bound_and_lru_thrashes():
    n, cap = 64, 32
    trace = simulate.cyclic(n, 4)
    lru = simulate.after_first_epoch(simulate.lru, trace, n, cap)
    ours = simulate.after_first_epoch(simulate.s3cache_policy, trace, n, cap, list(range(n)), 1)
    opt = simulate.after_first_epoch(simulate.belady, trace, n, cap)
    assert lru.hit_rate == 0.0
    assert ours.hit_rate >= 0.9 * opt.hit_rate
    assert opt.hit_rate <= cap / n + 1e-9


def test_simulated_scans_do_not_flush_the_hot_set():
    trace, hot = simulate.scan_with_hot_set(hot=20, scans=6, scan_len=80)
    assert simulate.s3cache_policy(trace, 40, hot, prefill=False).hit_rate > simulate.lru(trace, 40).hit_rate + 0.05


def test_simulated_shuffle_falls_back_to_lru():
    trace = simulate.shuffled(100, 3)
    assert simulate.s3cache_policy(trace, 50, list(range(100))).hit_rate >= simulate.lru(trace, 50).hit_rate - 0.02
