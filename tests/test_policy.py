"""The eviction policy and the simulator, pure (no daemon): fast, and exhaustive where it can be."""

from __future__ import annotations

from s3cache.policy import simulate
from s3cache.policy.evict import Resident, choose_victims
from s3cache.policy.tracker import ReaderTracker


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


def test_simulated_shuffle_without_an_announced_order_is_no_worse_than_lru():
    # After the first epoch (what the bill sees): the daemon's prefetch with no known future must not
    # churn (it used to evict each read file and fetch it again, more GETs than accesses).
    for seed in range(3):
        trace = simulate.shuffled(100, 4, seed)
        ours = simulate.after_first_epoch(simulate.s3cache_policy, trace, 100, 50, list(range(100)))
        lru = simulate.after_first_epoch(simulate.lru, trace, 100, 50)
        assert ours.gets <= ours.accesses and ours.hit_rate >= lru.hit_rate - 0.05


# -- announced orders ------------------------------------------------------------------------------

from s3cache.policy import evict  # noqa: E402
from s3cache.policy.order import Announcement, ListMap, permutation  # noqa: E402

MiB = 1 << 20


def test_with_an_announced_order_the_file_needed_furthest_in_it_goes():
    n = 10
    a = Announcement(seed=5, epoch=0, lists=ListMap(n), cursor=4)
    order = list(permutation(n, 5, 0))
    rs = [res(f"p{p}", p, used=50.0 + p) for p in range(n) if p != order[4]]
    future = evict.Future(n, announced=[a])
    got = pick(rs, future=future, target_distance=0, demand=True, lease=0.0)
    # the furthest next use: a file read earlier this epoch whose place in the next epoch's order is last
    far = max((p for p in range(n) if p != order[4]), key=a.distance)
    assert got == [f"p{far}"] and a.distance(far) >= n - 4
    # with a second reader about to read that file, it is needed soonest instead, and stays
    b = Announcement(seed=9, epoch=0, lists=ListMap(n), cursor=list(permutation(n, 9, 0)).index(far))
    both = evict.Future(n, announced=[a, b])
    assert both.distance(far) == 0
    assert pick(rs, future=both, target_distance=0, demand=True, lease=0.0) != [f"p{far}"]


def test_prefetch_follows_the_announced_order_within_the_window_and_beyond_it_only_into_free_space():
    n = 20
    a = Announcement(seed=3, epoch=1, lists=ListMap(n), cursor=0)
    order = list(permutation(n, 3, 1))
    have = {order[0], order[2]}
    wanted = lambda p: p not in have  # noqa: E731
    assert evict.next_prefetch(evict.Future(n, announced=[a]), wanted, lambda p: MiB, 4, 0) == (order[1], False)
    have |= {order[1], order[3]}
    assert evict.next_prefetch(evict.Future(n, announced=[a]), wanted, lambda p: MiB, 4, 0) == (None, True)
    assert evict.next_prefetch(evict.Future(n, announced=[a]), wanted, lambda p: MiB, 4, MiB) == (order[4], False)


def test_a_reader_that_stops_announcing_stops_counting_after_its_idle_time():
    t = ReaderTracker(idle=100)
    t.announce("a", Announcement(1, 0, ListMap(10)), now=0.0)
    assert t.future(10, 50.0).distance(permutation(10, 1, 0)[0]) == 0
    assert t.positions(10, 50.0) == []  # an announced reader is not also taken as an in-order one
    t.saw("a", permutation(10, 1, 0)[0], 10, 90.0)  # its notes keep it alive and move it along
    assert t.future(10, 150.0).distance(permutation(10, 1, 0)[1]) == 0
    assert not t.future(10, 191.0)  # silent for longer than idle: forgotten


def test_target_distance_for_prefetch_follows_the_readers_future():
    n = 10
    a = Announcement(1, 0, ListMap.share(n, 0, 2))  # this reader reads the even positions only
    f = evict.Future(n, announced=[a])
    assert evict.target_distance(4, True, f, n) == 0
    assert evict.target_distance(4, False, f, n) == a.distance(4)
    assert evict.target_distance(3, False, f, n) == 2 * n + 3  # nobody will read it: later than anything known
    assert evict.target_distance(3, False, evict.Future(n), n) == 3
    assert evict.target_distance(None, False, f, n) is None


def test_the_cursor_goes_back_only_for_evicted_files_nobody_read():
    assert evict.rewind_cursor(9, [res("a", 2, used=5.0), res("b", 6), res("x", None)]) == 6
    assert evict.rewind_cursor(3, [res("b", 6)]) == 3


def test_prefetch_that_knows_no_future_never_evicts_files_already_read():
    rs = [res("m-read", 5, used=1.0), res("x", None, used=2.0)]
    assert pick(rs, target_distance=8, need=2) is None
    assert pick(rs, demand=True, target_distance=0, need=2) == ["x", "m-read"]


# -- readahead window ------------------------------------------------------------------------------


def test_the_readahead_window_is_at_most_a_sixteenth_of_the_cache_at_every_scale():
    # issue 11: a 10.5 MiB cache of 1 MiB objects, default --readahead 16 MiB: no window at all now
    assert evict.readahead_files(21 * MiB // 2, MiB, 16 * MiB) == 0
    assert evict.readahead_files(1 << 40, 64 << 20, (1 << 40) // 8) == (1 << 40) // (64 << 20) // 16
    assert evict.readahead_files(1 << 40, 64 << 20, 2 << 30) == 32  # --readahead 2G within bounds: as asked
    assert evict.readahead_files(64 * MiB, MiB, 0, readahead_files=8) == 4  # --readahead 8f, capped
    assert evict.readahead_files(MiB, 2 * MiB, 16 * MiB) == 0


def test_a_prefetch_beyond_the_window_evicts_nothing_however_it_was_scheduled():
    # The flaky test of issue 11.3 (CI, [17, 13, 13] GETs): the scan picked files beyond the window for
    # the free room it saw, parallel workers took that room, and admission then evicted files the reader
    # had read (next needed in the next epoch) for them. A reader stands before 10; 1 and 7 were read.
    rs = [res("p1", 1, used=50.0), res("p7", 7, used=60.0)]
    fut = evict.Future(20, [10])
    # needed 5 files ahead, window 4: free room only, so nothing is evicted, whatever the distances say
    assert pick(rs, n=20, future=fut, target_distance=5, window=4) is None
    assert pick(rs, n=20, future=fut, target_distance=5, window=0) is None
    # within the window a file needed sooner takes the place of the one needed furthest away (7: 17 ahead)
    assert pick(rs, n=20, future=fut, target_distance=3, window=4) == ["p7"]
    # a waiting reader is never held back by the window
    assert pick(rs, n=20, future=fut, target_distance=0, window=0, demand=True) == ["p7"]
    # without a known future there is no window to speak of (manifest-order prefetch rules apply)
    assert pick([res("u9", 9)], n=20, target_distance=5, window=0) == ["u9"]


# -- leases ----------------------------------------------------------------------------------------


def test_leases_hold_each_readers_newest_files_within_a_share_of_the_budget():
    le = evict.Leases(lease=600.0, budget=8 * MiB, min_files=2)
    for i in range(20):
        le.saw("a", f"a{i}", MiB, float(i))
    assert le.held(20.0) == {f"a{i}" for i in range(12, 20)}  # 8 MiB: its newest eight
    for i in range(3):
        le.saw("b", f"b{i}", MiB, 20.0 + i)
    # two readers share the budget: 4 MiB each
    assert le.held(23.0) == {f"a{i}" for i in range(16, 20)} | {"b0", "b1", "b2"}
    le.saw("c", "big", 64 * MiB, 24.0)  # a reader's two newest files are held whatever their size
    assert "big" in le.held(24.0)
    assert le.held(623.0) == {"big"}  # 600 s after its use a file is never held
    assert le.held(625.0) == set()


def test_a_file_that_lands_after_its_reader_moved_on_keeps_the_readers_place_not_the_newest():
    # The lease race of issue 11, as the daemon logged it: a reader took 062 between its rename and its
    # commit (a ticket, no lease yet), then 033 and 004, whose notes were applied in one batch with one
    # timestamp; 062 landed after. Ordered by time, the tie put 062 last and pushed 004, the file the
    # reader held, out of its two newest: evicted, and the reader's re-open failed.
    le = evict.Leases(lease=2.0, budget=0, min_files=2)
    took_062 = le.ticket()
    le.saw("r", "033", 1, 5.0)
    le.saw("r", "004", 1, 5.0)
    le.saw("r", "062", 1, 5.01, place=took_062)
    assert le.held(5.02) == {"033", "004"}
    le.saw("r", "000", 1, 5.03)
    assert le.held(5.04) == {"004", "000"}


def test_a_full_cache_of_files_a_reader_moved_past_never_blocks_it():
    # A reader read 100 files in 100 s into a 100-file cache with --lease 600: under the rule before,
    # every file is leased and the reader waits for its next file until the lease runs out.
    rs = [res(f"p{i}", i, used=float(i + 1)) for i in range(100)]
    assert pick(rs, n=200, demand=True, target_distance=0, now=100.0, lease=600.0, protected={99}) is None
    le = evict.Leases(lease=600.0, budget=100 // evict.LEASE_SHARE)
    for i in range(100):
        le.saw("r", f"p{i}", 1, float(i + 1))
    got = pick(rs, n=200, demand=True, target_distance=0, now=100.0, lease=600.0, protected={99},
               held=le.held(100.0))
    assert got is not None and not {"p97", "p98", "p99"} & set(got)


def test_a_waiting_reader_may_take_the_place_of_the_file_it_reads_next():
    # 3-file cache: the reader's two newest files leased, its next file resident, it waits for this one
    rs = [res("p0", 0, used=1.0), res("p1", 1, used=2.0), res("p2", 2, used=3.0)]
    assert pick(rs, n=4, readers=[0], demand=True, target_distance=0, protected={3},
                held={"p1", "p2"}) == ["p0"]


def test_a_manifest_shorter_than_the_stride_is_still_read_in_order():
    t = ReaderTracker(idle=100, stride=4)
    for i, p in enumerate([0, 1, 2, 3, 0, 1]):
        t.saw("a", p, 4, float(i))
    assert t.positions(4, 6.0) == [2] and t.epoch_of("a") == 1


def test_a_full_filesystem_may_still_free_files_already_read():
    # _evict_for_disk: no file in view (target None), nobody waiting, no order known
    assert pick([res("m-read", 5, used=1.0)], target_distance=None) == ["m-read"]


def test_a_lease_that_lands_late_keeps_its_place_in_the_readers_order():
    """A reader may see a file appear (renamed) before the daemon marks it ready and move on to newer
    files; the late lease must not push those newer files out (the 16-reader lease test caught it)."""
    from s3cache.policy.evict import Leases

    leases = Leases(10.0, 0)
    took_y = leases.ticket()  # taken before a and b, ready after them
    leases.saw("r", "a", 1, 2.0)
    leases.saw("r", "b", 1, 3.0)
    leases.saw("r", "y", 1, 4.0, place=took_y)
    assert leases.held(4.5) == {"a", "b"}
    leases.saw("r", "c", 1, 5.0)
    assert leases.held(5.5) == {"b", "c"}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_readers_go_silent_on_the_trackers_own_clock_not_the_wall_clock():
    """Silence is a duration: the tracker measures it on its injected (monotonic) clock, so a wall
    clock stepped an hour on forgets no reader, and one stepped back keeps none past ``idle``."""
    clock = Clock()
    t = ReaderTracker(idle=100, stride=4, clock=clock)
    for p in range(4):
        t.saw("a", p, 10)  # in order: its next position is known
    clock.t += 99
    assert t.positions(10) == [4]
    clock.t += 2
    assert t.positions(10) == []  # silent for longer than idle on its clock: forgotten
    t.announce("b", Announcement(1, 0, ListMap(10)))
    clock.t += 99
    assert t.future(10)
    clock.t += 2
    assert not t.future(10)


def test_the_daemons_parts_tell_the_tracker_no_time_of_their_own(tmp_path):
    """Notes reach the tracker through the readers part with no wall-clock reading: with the tracker's
    clock standing still, a reader is never forgotten however far the wall clock moves."""
    from parts import Rig, catalog, entry

    rig = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    try:
        clock = Clock(t=5.0)  # far below any wall-clock reading: a wall time would count as silence
        rig.tracker.clock = clock
        uris = [f"s3://bkt/{i}" for i in range(10)]
        rig.install(catalog(*(entry(u, 1) for u in uris)))
        with rig.cond:
            rig.readers.note_use("p1", uris[:4], True)
            assert rig.tracker.positions(10) == [4]
            clock.t += rig.tracker.idle + 1
            assert rig.tracker.positions(10) == []
    finally:
        rig.close()
