"""The space (s3cache/space.py) on a real cache dir and index: admission, eviction under the lease
lock, commit, withdrawal, pins, the disk-full state and usage flushing."""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import replace

import pytest
from parts import Rig, catalog, entry

from s3cache.daemon.space import Space
from s3cache.errors import PinQuotaExceeded

B = "s3://bkt/"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=100, lease=600.0)
    yield r
    r.close()


def test_admission_never_lets_ready_plus_reserved_exceed_the_maximum(rig):
    sp = rig.space
    assert sp.admit(entry(B + "a", 60), 60, demand=False)
    assert not sp.admit(entry(B + "b", 50), 50, demand=False)  # nothing to evict
    assert not sp.admit(entry(B + "c", 101), 101, demand=True)  # never fits
    assert (sp.used, sp.reserved, sp.reservations) == (0, 60, {B + "a": 60})
    assert sp.admit(entry(B + "a", 60), 60, demand=False)  # one reservation per URI
    assert sp.reserved == 60
    sp.release(B + "a")
    assert (sp.reserved, sp.free()) == (0, 100)


def test_commit_turns_a_reservation_into_ready_bytes_and_returns_the_replaced_file(rig):
    sp = rig.space
    old = rig.cached(B + "a", b"x" * 30)
    assert sp.admit(entry(B + "a", 40), 40, demand=True)
    new = replace(old, path="other/a", size=40)
    with rig.cond:
        sp.mark_disk_full(1)
        replaced = sp.commit([(B + "a", new)])
    assert replaced == [old]
    assert (sp.used, sp.reserved, sp.reservations) == (40, 0, {})
    assert sp.ready[B + "a"] == new
    assert not sp.disk_full  # a publish wrote bytes


def test_eviction_removes_the_file_and_its_row_and_reports_the_positions(rig):
    rig.install(catalog(entry(B + "a"), entry(B + "b"), entry(B + "c")))
    rec_a = rig.cached(B + "a", b"a" * 50)
    rig.cached(B + "b", b"b" * 40)
    assert rig.space.admit(entry(B + "c", 30), 30, demand=False) is False  # a, b unread: kept for c
    rig.schedule.cursors.next(lambda p: False)  # prefetch got past the end
    assert rig.space.admit(entry(B + "c", 30), 30, demand=True)  # a reader waits: make room
    sp = rig.space
    assert sp.used + sp.reserved <= rig.s.max_size
    # Both unread, so the one furthest down the manifest goes, and only as much as is needed.
    assert sp.is_ready(B + "a") and not sp.is_ready(B + "b")
    assert (sp.evicted, sp.evicted_bytes, sp.used, sp.reserved) == (1, 40, 50, 30)
    assert rig.index.get(B + "b") is None and rig.index.get(B + "a") == rec_a
    assert not os.path.exists(rig.store.layout.abspath("bkt/b"))
    assert rig.evicted_positions == [[1]]
    assert rig.schedule.cursors.positions() == [1]  # the schedule was told: b may be prefetched again


def test_eviction_drains_readers_notes_holding_the_lease_lock_then_the_state_lock(rig):
    """A note a reader sent before eviction is applied first, so the file it names is leased."""
    rig.install(catalog(entry(B + "a"), entry(B + "b")))
    rig.cached(B + "a", b"a" * 90)
    seen = {}
    probe = os.open(rig.store.layout.lease_lock, os.O_RDONLY)
    drain = rig.readers.drain

    def drain_and_look() -> None:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            seen["lease"] = "free"
        except BlockingIOError:
            seen["lease"] = "exclusive"
        seen["state"] = rig.cond._is_owned()
        drain()

    rig.space._drain_notes = drain_and_look
    rig.notes.append(("reader-1", "h", B + "a"))  # a reader resolved a just now
    try:
        assert rig.space.admit(entry(B + "b", 50), 50, demand=True) is False  # a is leased
    finally:
        os.close(probe)
    assert seen == {"lease": "exclusive", "state": True}
    assert rig.space.is_ready(B + "a") and rig.space.ready[B + "a"].last_used > 0
    assert rig.readers.hits == 1


def test_evict_for_disk_frees_what_nobody_needs_soon(rig):
    rig.cached(B + "x", b"x" * 20)  # not in the manifest: goes first
    assert rig.space.evict_for_disk(10)
    assert not rig.space.is_ready(B + "x") and rig.space.evicted_bytes == 20
    assert not rig.space.evict_for_disk(10)  # nothing left


def test_a_file_removed_behind_our_back_is_forgotten_and_its_size_remembered(rig):
    rig.install(catalog(entry(B + "a")))  # the manifest gives no size
    rec = rig.cached(B + "a", b"a" * 7)
    os.unlink(rig.store.layout.abspath(rec.path))
    with rig.cond:
        assert rig.space.ready_path(B + "a") is None
    assert not rig.space.is_ready(B + "a") and rig.space.used == 0
    assert rig.space.size_hint(B + "a") == 7


def test_a_new_manifest_returns_cached_files_of_another_version_or_size(rig):
    rig.cached(B + "a", b"a" * 5)
    rig.cached(B + "b", b"b" * 5)
    rig.cached(B + "c", b"c" * 5)
    stale = rig.install(catalog(entry(B + "a", 6), entry(B + "b", version="v2"), entry(B + "c", 5)))
    assert sorted(r.path for r in stale) == ["bkt/a", "bkt/b"]
    assert not rig.space.is_ready(B + "a") and not rig.space.is_ready(B + "b") and rig.space.is_ready(B + "c")
    assert rig.space.used == 5


def test_withdraw_quarantines_only_the_file_that_was_checked(rig):
    rec = rig.cached(B + "a", b"a" * 5)
    with rig.space.exclusive():
        assert rig.space.withdraw(B + "a", replace(rec, path="elsewhere/a"), quarantine=True) == (False, None, None)
        # Same path, another file (fetched again meanwhile): not the one that was checked.
        assert rig.space.withdraw(B + "a", replace(rec, fetched_at=rec.fetched_at - 1), quarantine=True) \
            == (False, None, None)
        done, where, error = rig.space.withdraw(B + "a", rec, quarantine=True)
    assert error is None
    assert done and os.path.exists(where) and where.startswith(rig.store.layout.quarantine)
    assert not os.path.exists(rig.store.layout.abspath(rec.path))
    assert rig.index.get(B + "a") is None and not rig.space.is_ready(B + "a")


def test_usage_is_flushed_to_the_index(rig):
    rig.cached(B + "a", b"a")
    when = time.time()
    with rig.cond:
        assert rig.space.touch(B + "a", when)
        assert not rig.space.touch(B + "missing", when)
    rig.space.flush()
    assert rig.index.get(B + "a").last_used == when


def test_pins_are_durable_and_protect_from_eviction(rig, tmp_path):
    rig.space.s = replace(rig.s, pin_quota=1.0)  # this test is about pins, not their quota
    rig.install(catalog(entry(B + "a"), entry(B + "p", pin=True)))
    rig.cached(B + "a", b"a" * 60)
    rig.cached(B + "p", b"p" * 30)
    with rig.cond:
        assert rig.space.pin([B + "a"], True) == [{"uri": B + "a", "outcome": "pinned"}]
        assert rig.space.pin_count() == 2  # a by the CLI, p by the manifest: each once
    assert not rig.space.admit(entry(B + "z", 50), 50, demand=True)  # a is pinned, p is pinned by the manifest
    with rig.cond:
        assert rig.space.pin([B + "a", B + "never"], False) == [{"uri": B + "a", "outcome": "unpinned"},
                                                                {"uri": B + "never", "outcome": "not_pinned"}]
        assert rig.space.pin_count() == 1
        assert rig.space.pin([B + "a", B + "p"], True) == [{"uri": B + "a", "outcome": "pinned"},
                                                           {"uri": B + "p", "outcome": "manifest"}]
    again = Space(rig.s, rig.store, rig.index, rig.cond, rig.tracker, drain_notes=lambda: None,
                  on_evicted=lambda _: None)
    try:
        assert again.pinned == {B + "a"}
    finally:
        again.close()
    status = rig.space.status()
    assert status["pinned"] == {"files": 2, "bytes": 90, "objects": 2, "quota_bytes": 100}


def test_pins_have_a_quota_and_over_it_nothing_changes(rig):
    rig.install(catalog(entry(B + "m", 20, pin=True), entry(B + "sized", 25)))
    rig.cached(B + "a", b"a" * 20)
    with rig.cond:
        assert rig.space.pin_quota() == 50  # pin_quota 0.5 of this rig's max_size 100
        assert rig.space.pin([B + "a"], True)[0]["outcome"] == "pinned"  # 20 (manifest) + 20 = 40
        with pytest.raises(PinQuotaExceeded, match=r"pin quota of 50 B \(pin_quota 0.5 of --max-size 100 B\)"):
            rig.space.pin([B + "sized", B + "unknown"], True)  # 40 + 25 > 50
        assert rig.space.pinned == {B + "a"} and rig.space.pin_count() == 2
        assert rig.space.pin([B + "unknown"], True)[0]["outcome"] == "pinned"  # size unknown yet: counts once known
        # the largest object that can ever be cached beside the cached pinned files (a: 20 bytes)
        assert rig.space.max_fit(B + "z") == 80 and rig.space.max_fit(B + "a") == 100


def test_a_full_disk_is_over_once_the_filesystem_has_room(rig):
    with rig.cond:
        rig.space.mark_disk_full(10)
    assert rig.space.disk_full
    assert rig.space.space_returned()  # tmp_path has more than 1 MiB free
    assert not rig.space.disk_full and not rig.space.space_returned()


def test_status_reports_this_parts_keys(rig):
    rig.cached(B + "a", b"a" * 3)
    with rig.cond:
        st = rig.space.status()
    assert st["ready"] == 1 and st["verified_by"] == {"size": 1} and st["disk_full"] is False
    assert st["bytes"]["ready"] == 3 and st["bytes"]["reserved"] == 0 and st["bytes"]["max"] == 100
    assert 0 <= st["bytes"]["free_fraction"] <= 1 and st["evicted"] == 0 and st["evicted_bytes"] == 0


def test_flush_never_writes_back_a_row_deleted_while_it_wrote(rig):
    """Issue 17 item 14: flush snapshots usage under the state lock and writes it outside; a row
    eviction deleted in between must stay deleted (and the file's replacement must keep its own row)."""
    import sqlite3
    import threading

    rec_a = rig.cached(B + "a", b"a")
    rig.cached(B + "b", b"b")
    with rig.cond:
        rig.space.touch(B + "a", 123.0)
        rig.space.touch(B + "b", 456.0)
    db = sqlite3.connect(os.path.join(rig.store.layout.index, "cache.db"), timeout=60, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # holds the index's write lock: flush's write must wait for it
        t = threading.Thread(target=rig.space.flush)
        t.start()
        deadline = time.monotonic() + 30
        while rig.space._dirty_use and time.monotonic() < deadline:  # flush took its snapshot
            time.sleep(0.01)
        assert not rig.space._dirty_use
        # meanwhile "a" is evicted: file and row go, as Space._evict does them
        with rig.cond:
            rig.space.forget(B + "a")
        rig.store.remove(rec_a.path)
        db.execute("DELETE FROM Cache WHERE key = ?", (B + "a",))
        db.execute("COMMIT")
        t.join(30)
    finally:
        db.close()
    assert rig.index.get(B + "a") is None  # not re-inserted
    assert rig.index.get(B + "b").last_used == 456.0  # the row still there was updated
