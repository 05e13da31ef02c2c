"""The early parts' pool (s3cache/fetch/pool.py): the waiting part of the lowest rank (the job's earliest
file) starts first, whatever order the parts were submitted in; failures reach the caller; shutdown
cancels what waits and ends every thread."""

from __future__ import annotations

import threading

import pytest

from s3cache.fetch.pool import OrderedPool
from s3cache.testing import wait_for


def test_the_waiting_task_of_the_lowest_rank_runs_first_then_in_submission_order():
    pool = OrderedPool(1, "test")
    gate = threading.Event()
    ran: list[str] = []
    busy = pool.submit(gate.wait, 30)  # the only thread is taken: the next ones wait in the queue
    futures = [pool.submit(ran.append, name, rank=rank)
               for name, rank in (("third file", 2), ("first file", 0), ("second file", 1), ("first file again", 0))]
    gate.set()
    assert busy.result(30)
    for f in futures:
        f.result(30)
    assert ran == ["first file", "first file again", "second file", "third file"]
    pool.shutdown(wait=True)


def test_a_tasks_failure_reaches_its_caller_and_the_pool_keeps_running():
    pool = OrderedPool(2, "test")

    def boom() -> None:
        raise OSError("a part failed")

    with pytest.raises(OSError, match="a part failed"):
        pool.submit(boom).result(30)
    assert pool.submit(lambda: 42).result(30) == 42
    pool.shutdown(wait=True)


def test_shutdown_cancels_waiting_tasks_ends_every_thread_and_refuses_new_ones():
    pool = OrderedPool(1, "test")
    gate = threading.Event()
    busy = pool.submit(gate.wait, 30)
    waiting = pool.submit(lambda: "never")
    stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True})
    stopper.start()
    wait_for(waiting.cancelled, 30, "the waiting task to be cancelled")  # the only thread is still busy
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive() and busy.result(30)
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
