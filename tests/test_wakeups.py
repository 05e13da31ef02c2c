"""Waking idle workers (s3cache/daemon/handout.py, schedule.py): a job that ends or a reader's want wakes
as many workers as there are jobs to hand out, not every idle one; whoever else waits on the state lock
(``Schedule.wait_ended``) is still woken. Real worker threads on ``next_job``, a real publisher, cache dir
and index; every wait is on a condition."""

from __future__ import annotations

import queue
import threading

import pytest
from parts import Rig, catalog, control_connection, entry

from s3cache.daemon.publisher import Publisher
from s3cache.fetch.checksum import local_crc32c_of
from s3cache.fetch.fetcher import Fetched
from s3cache.testing import wait_for

B = "s3://bkt/"
WORKERS = 2
THREADS = 6  # as in the daemon, more threads than prefetch slots: the rest wait for readers' objects


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1 << 20, lease=600.0, workers=WORKERS)

    def on_published(items, now):  # what the daemon's does
        for uri, _ in items:
            r.schedule.fetched(uri)
        r.readers.landed(items, now)

    r.publisher = Publisher(r.store, r.index, r.space, r.cond, on_published=on_published,
                            on_failed=lambda uri, code, msg: None)
    r.jobs = queue.Queue()
    r.schedule.idle_poll = 600.0  # a lost wake is a job never handed out (within the test's waits)

    def worker() -> None:  # takes jobs and leaves them in flight: only publishing ends one
        while (job := r.schedule.next_job()) is not None:
            r.jobs.put(job)

    r.threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in r.threads:
        t.start()
    yield r
    r.stopping.set()
    with r.cond:
        r.cond.notify_all()
    for t in r.threads:
        t.join(30)
    assert not any(t.is_alive() for t in r.threads)
    r.close()


def settled(rig, handed: int) -> None:
    """Wait until ``handed`` jobs were handed out and every thread waits in ``next_job``, none of them
    notified and not yet running: a notify takes its waiter off the condition's list at once, so the
    list's length says it (``idle_workers`` still counts a thread notified but not yet running)."""
    wait_for(lambda: rig.jobs.qsize() == handed and len(rig.cond._waiters) == THREADS, 30,
             f"{handed} jobs handed out and every worker waiting")


def publish(rig, uri: str) -> None:
    tmp = rig.temp_file(b"x" * 10)
    assert rig.space.admit(entry(uri, 10), 10, demand=False)
    rig.publisher.publish([(entry(uri, 10), Fetched(tmp, 10, "e", "", "md5", local_crc32c_of(tmp)))])


def test_a_published_job_wakes_one_idle_worker_not_all_of_them(rig):
    u = [f"{B}{i:03d}" for i in range(10)]
    rig.install(catalog(*(entry(x, 10) for x in u)))  # wakes every worker: prefetch fills its two slots
    settled(rig, WORKERS)
    first = rig.jobs.get()
    before = rig.schedule.wakeups
    publish(rig, first[0].uri)
    settled(rig, WORKERS)  # the freed slot went out again (one job was taken off the queue above)
    # Every publish woke all six threads before; one is enough.
    assert rig.schedule.wakeups - before <= 1
    assert [j[0].uri for j in list(rig.jobs.queue)] == [u[1], u[2]]


def test_a_want_wakes_a_worker_per_object_queued(rig, tmp_path):
    rig.install(catalog())
    settled(rig, 0)
    before = rig.schedule.wakeups
    with control_connection(tmp_path) as (conn, _):
        wanted = [B + "a", B + "b", B + "c"]
        assert [r["state"] for r in rig.readers.want(conn, "r1", wanted)] == ["pending"] * 3
        settled(rig, 3)
        assert sorted(j[0].uri for j in list(rig.jobs.queue)) == wanted
    # Every want woke every idle thread before; now one per object queued, and one for a prefetch
    # the want may have made a reader's.
    assert rig.schedule.wakeups - before <= 4


@pytest.mark.parametrize("landed", [False, True], ids=["downloading", "landed"])
def test_waiting_for_a_fetch_to_end_is_woken_although_wakes_are_targeted(rig, landed):
    rig.install(catalog(entry(B + "a", 10)))
    settled(rig, 1)
    if landed:  # its file went to the publisher: its end gives no slot back, and wakes no worker
        with rig.cond:
            rig.schedule.landed(B + "a")
    ended = threading.Event()

    def wait_for_it() -> None:
        with rig.cond:
            if rig.schedule.wait_ended(B + "a", timeout=60):
                ended.set()

    t = threading.Thread(target=wait_for_it, daemon=True)
    t.start()
    wait_for(lambda: rig.schedule._ending, 30, "the waiter to wait")
    publish(rig, B + "a")  # one job ended: a targeted wake could go to an idle worker instead
    assert ended.wait(30), "wait_ended was not woken when the fetch ended"
    t.join(30)


@pytest.fixture
def bare(tmp_path):
    """A rig whose jobs the test takes itself (no worker threads of the fixture)."""
    r = Rig(tmp_path / "cache", max_size=1 << 20, lease=600.0, workers=WORKERS)
    r.schedule.idle_poll = 600.0
    r.publisher = Publisher(r.store, r.index, r.space, r.cond,
                            on_published=lambda items, now: [r.schedule.fetched(u) for u, _ in items],
                            on_failed=lambda uri, code, msg: None)
    yield r
    r.stopping.set()
    with r.cond:
        r.cond.notify_all()
    r.close()


def next_job_on_a_thread(rig) -> queue.Queue:
    """``next_job`` called by a worker thread of its own: its job arrives in the queue returned."""
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: out.put(rig.schedule.next_job()), daemon=True).start()
    return out


def test_a_worker_hands_its_file_on_and_takes_the_next_job_without_a_wake(bare):
    u = [f"{B}{i:03d}" for i in range(8)]
    bare.install(catalog(*(entry(x, 10) for x in u)))
    jobs = [bare.schedule.next_job() for _ in range(WORKERS)]  # prefetch's share: full now
    with bare.cond:
        bare.schedule.landed(jobs[0][0].uri)  # its file goes to the publisher: its slot is free
    assert next_job_on_a_thread(bare).get(timeout=30) == (entry(u[2], 10), False)
    idle = next_job_on_a_thread(bare)  # prefetch's share is taken again: this one waits
    wait_for(lambda: len(bare.cond._waiters) == 1, 30, "a worker waiting in next_job")
    before = bare.schedule.wakeups
    publish(bare, u[0])  # the job ends; its slot was given back already: nobody is woken for it
    # (a notify takes the waiter off the list at once: had it been woken, it is back only once it ran)
    wait_for(lambda: len(bare.cond._waiters) == 1, 30, "the worker waiting again")
    assert bare.schedule.wakeups == before and u[0] not in bare.schedule.fetching
    assert bare.schedule.landing == set() and idle.empty()


def test_files_waiting_for_the_publisher_beyond_workers_hold_prefetch_back(bare):
    u = [f"{B}{i:03d}" for i in range(8)]
    bare.install(catalog(*(entry(x, 10) for x in u)))
    taken = [bare.schedule.next_job()[0].uri for _ in range(WORKERS)]
    for i in range(WORKERS):  # each landed job frees its slot, up to ``workers`` of them
        with bare.cond:
            bare.schedule.landed(taken[i])
        taken.append(bare.schedule.next_job()[0].uri)
    with bare.cond:
        bare.schedule.landed(taken[WORKERS])  # one more than ``workers`` waiting for the publisher
    waiting = next_job_on_a_thread(bare)
    wait_for(lambda: bare.schedule.idle_workers == 1, 30, "the worker to wait: prefetch is held back")
    assert waiting.empty()
    publish(bare, taken[0])  # the publisher catches up: the worker is woken and takes a job
    assert waiting.get(timeout=30) == (entry(u[2 * WORKERS], 10), False)


def test_a_want_that_promotes_prefetches_gets_every_queued_hint_a_worker(bare, tmp_path):
    """A reader wants two hinted files already downloading as prefetch: both become a reader's, two
    prefetch slots come free, and the two next hints queued behind them go out at once, each to a worker
    still idle (the others are busy downloading). The want woke one worker, which passed the wake on only
    while prefetch could hand out more: with no manifest to prefetch from, the second hint waited for
    the idle poll (a second)."""
    bare.install(catalog())  # no manifest: every job is demand (hints here)
    workers = [next_job_on_a_thread(bare) for _ in range(2 * WORKERS)]  # each takes one job, then is busy
    wait_for(lambda: len(bare.cond._waiters) == 2 * WORKERS, 30, "every worker waiting")
    hints = [f"{B}h{i}" for i in range(6)]
    with control_connection(tmp_path) as (conn, _):
        bare.readers.want(conn, "r1", [], ahead=hints)
        wait_for(lambda: sum(not w.empty() for w in workers) == WORKERS, 30, "prefetch's share handed out")
        first = sorted(w.queue[0][0].uri for w in workers if not w.empty())
        assert first == hints[:WORKERS]
        bare.readers.want(conn, "r1", first)  # both in flight: promoted, their slots free
        wait_for(lambda: all(not w.empty() for w in workers), 30, "both idle workers to take a hint")
    assert sorted(w.queue[0][0].uri for w in workers) == hints[:2 * WORKERS]


def test_a_publish_that_ends_a_full_disk_wakes_the_workers_it_held_back(bare):
    """A worker found the disk full; workers with nothing else to do wait. A publish that writes bytes
    says the filesystem has room again: prefetch may resume, and an idle worker must be woken for it
    (a publish ends a landing job, which frees no slot, so nothing else wakes anyone)."""
    u = [f"{B}{i:03d}" for i in range(8)]
    bare.install(catalog(*(entry(x, 10) for x in u)))
    first = bare.schedule.next_job()[0].uri  # one prefetch downloading
    with bare.cond:
        bare.space.mark_disk_full(10)  # another worker's ENOSPC: prefetch holds back
        bare.schedule.landed(first)  # as a worker does before handing its file to the publisher
    idle = next_job_on_a_thread(bare)
    wait_for(lambda: len(bare.cond._waiters) == 1, 30, "a worker waiting on the full disk")
    publish(bare, first)
    assert idle.get(timeout=30) == (entry(u[1], 10), False)


def test_waiting_for_a_fetch_to_end_stops_waiting_when_the_daemon_stops(rig):
    """``verify`` waits this way for a replaced file's new copy; a stop must not wait out its timeout."""
    rig.install(catalog(entry(B + "a", 10)))
    settled(rig, 1)
    out: list = []

    def wait_for_it() -> None:
        with rig.cond:
            out.append(rig.schedule.wait_ended(B + "a", timeout=600))

    t = threading.Thread(target=wait_for_it, daemon=True)
    t.start()
    wait_for(lambda: rig.schedule._ending, 30, "the waiter to wait")
    rig.stopping.set()  # as DaemonRoot.stop does: set, then wake every waiter on the state lock
    with rig.cond:
        rig.cond.notify_all()
    t.join(30)
    assert out == [False], "wait_ended did not give up when the daemon stopped"
