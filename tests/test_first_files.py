"""The schedule's hold for a job's first files: while one handed out as prefetch has bytes not yet asked
for, no other prefetch is handed out; it goes once each of them was asked for or ended. Shown on the
schedule's own parts (no fetcher: the test says what the workers' fetch would, ``Schedule.asked``)."""

from __future__ import annotations

import threading

import pytest
from parts import Rig, catalog, control_connection, entry

from s3cache.testing import wait_for

B = "s3://bkt/"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0, workers=4)
    r.schedule.first_files = 2
    yield r
    r.close()


def test_other_prefetch_waits_until_every_first_file_was_asked_for_or_ended(rig):
    u = [f"{B}{i}" for i in range(4)]
    rig.install(catalog(*(entry(x, 10) for x in u)))
    assert [rig.schedule.next_job() for _ in range(2)] == [(entry(u[0], 10), False), (entry(u[1], 10), False)]
    assert rig.schedule.early == {u[0]: 0, u[1]: 1} and rig.schedule.unasked == {u[0], u[1]}
    got: list = []
    worker = threading.Thread(target=lambda: got.append(rig.schedule.next_job()))
    worker.start()
    try:
        # u[2] is wanted and a prefetch slot is free, yet the worker finds nothing to take: it is held.
        wait_for(lambda: rig.schedule.idle_workers == 1, 30, "the worker to wait with u[2] held back")
        with rig.cond:
            rig.schedule.asked(u[0])
        assert rig.schedule.unasked == {u[1]}
        wait_for(lambda: rig.schedule.idle_workers == 1, 30, "the worker still waiting")
        assert got == []
        with rig.cond:  # the last first file fails before all its bytes were asked for: the hold ends too
            rig.schedule.fail(u[1], "InternalError", "gone")
        worker.join(30)
        assert got == [(entry(u[2], 10), False)]
        assert rig.schedule.unasked == set() and rig.schedule.early == {u[0]: 0}
    finally:
        rig.stopping.set()
        with rig.cond:
            rig.cond.notify_all()
        worker.join(30)


def test_a_file_a_reader_waits_on_is_no_early_file_and_holds_nothing_back(rig, tmp_path):
    """The first file a reader already waits on when it is handed out is a reader's fetch, not early:
    other prefetch is not held for it."""
    u = [f"{B}{i}" for i in range(3)]
    rig.install(catalog(*(entry(x, 10) for x in u)))
    with rig.cond:
        assert rig.schedule.first_order(u[0]) == 0 and rig.schedule.first_order(u[2]) is None
    with control_connection(tmp_path) as (conn, _):
        assert [r["state"] for r in rig.readers.want(conn, "r1", [u[0]])] == ["pending"]
        assert rig.schedule.next_job() == (entry(u[0], 10), True)
        assert rig.schedule.unasked == set()
        assert rig.schedule.next_job() == (entry(u[1], 10), False)  # early: holds the rest
        assert rig.schedule.unasked == {u[1]}
        with rig.cond:
            rig.schedule.landed(u[1])  # downloaded: its bytes were all asked for
        assert rig.schedule.next_job() == (entry(u[2], 10), False)
