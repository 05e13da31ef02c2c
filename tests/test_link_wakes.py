"""Every stream waiting for a slot that may take one is woken by the change that lets it, not by the
link's poll: the poll is raised to an hour here, so a lost wake is a wait that does not end before the
test's deadline (no timing is asserted)."""

from __future__ import annotations

import threading

import pytest

from s3cache.fetch import link as link_mod
from s3cache.fetch.link import WINDOW, Link
from s3cache.testing import wait_for

DEADLINE = 30  # seconds: far beyond any wake, far below the raised poll


LINKS: list[Link] = []


@pytest.fixture(autouse=True)
def no_poll(monkeypatch):
    monkeypatch.setattr(link_mod, "POLL", 3600.0)
    yield
    for link in LINKS:  # a stream left waiting by a failed test ends as Cancelled, not after the poll
        link.cancel.set()
        link.wake()
    LINKS.clear()


def new_link(capacity: int, **kw) -> Link:
    link = Link(capacity, **kw)
    LINKS.append(link)
    return link


def link_mod_cancelled() -> type:
    from s3cache.fetch.retry import Cancelled

    return Cancelled


def saturated() -> Link:
    """A link measured to be the limit (as in test_link.py): twice the connections moved the same bytes."""
    now = [0.0]
    link = new_link(4, clock=lambda: now[0])
    for streams in (2, 4):
        for _ in range(streams):
            link.acquire(False)
        now[0] += WINDOW
        link.moved(int(100e6 * WINDOW))
        for _ in range(streams):
            link.release(False)
    assert link.limited
    return link


class Prio:
    def __init__(self, foreground: bool = False) -> None:
        self.foreground = foreground


def start(fn) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except link_mod_cancelled():
            return
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done


def test_prefetch_held_for_a_reader_takes_the_slot_left_once_the_reader_has_one():
    """Two slots free at once while a reader's stream and a prefetch stream wait: the reader's takes
    one and the prefetch stream the other, whichever of the two woke first. (When the prefetch stream
    re-checked first it saw a reader waiting and slept again; nothing woke it once the reader's stream
    had its slot.) Repeated, as the order the two wake in is the scheduler's."""
    for _ in range(200):
        two_slots_free_at_once()


def two_slots_free_at_once() -> None:
    link = new_link(2)
    link.acquire(False)
    link.acquire(False)
    fg, fg_done = start(lambda: link.acquire(True))
    wait_for(lambda: link.fg_waiting == 1, DEADLINE, "the reader's stream to wait")
    bg, bg_done = start(lambda: link.acquire(False, Prio()))
    wait_for(lambda: bg.is_alive() and not bg_done.is_set(), DEADLINE, "the prefetch stream to wait")
    with link._cond:  # both slots come back before either waiter runs
        link.release(False)
        link.release(False)
    assert fg_done.wait(DEADLINE), "the reader's stream was not woken"
    assert bg_done.wait(DEADLINE), "a prefetch stream slept on with a slot free and no reader waiting"
    fg.join(DEADLINE)
    bg.join(DEADLINE)
    assert (link.fg, link.bg) == (1, 1)


def test_prefetch_held_on_a_saturated_link_streams_once_the_last_reader_is_done():
    """On a link measured to be the limit, prefetch waits while readers' fetches are in flight; the last
    one ending (the fetcher sets ``readers``) lets it take the free slot at once."""
    link = saturated()
    link.readers = 1
    t, done = start(lambda: link.acquire(False, Prio()))
    wait_for(lambda: t.is_alive() and not done.is_set() and link.free() > 0, DEADLINE,
             "prefetch to wait beside a free slot")
    link.readers = 0
    assert done.wait(DEADLINE), "prefetch slept on after the last reader's fetch ended"
    t.join(DEADLINE)
    assert link.bg == 1


def test_early_streams_take_free_slots_in_their_files_order():
    """The first file's early stream goes first; the second file's, waiting behind it, takes the next
    slot as soon as the first has its own, and plain prefetch after both."""
    link = new_link(3)
    for _ in range(3):
        link.acquire(False)

    class Early(Prio):
        def __init__(self, order: int) -> None:
            super().__init__()
            self.early, self.order = True, order

    second, second_done = start(lambda: link.acquire(False, Early(2)))
    first, first_done = start(lambda: link.acquire(False, Early(1)))
    wait_for(lambda: link.early_waiting == 2, DEADLINE, "both early streams to wait")
    plain, plain_done = start(lambda: link.acquire(False, Prio()))
    wait_for(lambda: plain.is_alive() and not plain_done.is_set(), DEADLINE, "plain prefetch to wait")
    with link._cond:
        for _ in range(3):
            link.release(False)
    for t, done, who in ((first, first_done, "first file's"), (second, second_done, "second file's"),
                         (plain, plain_done, "plain prefetch")):
        assert done.wait(DEADLINE), f"the {who} stream slept on with a slot free"
        t.join(DEADLINE)
    assert link.bg == 3 and link.early_waiting == 0


@pytest.mark.parametrize("foreground", [False, True], ids=["prefetch", "readers"])
def test_every_stream_waiting_gets_a_slot_when_slots_come_free_one_or_two_at_a_time(foreground):
    """Only plain prefetch waits, or only readers' streams: a freed slot wakes one of them, so a second
    slot freed before that one ran must wake another, and every waiter ends up streaming."""
    link = new_link(4)
    for _ in range(4):
        link.acquire(False)
    waiters = [start(lambda: link.acquire(foreground, Prio(foreground))) for _ in range(8)]
    wait_for(lambda: all(t.is_alive() for t, _ in waiters), DEADLINE, "the streams to start")
    released = 0
    while released < 8:  # each slot freed is taken by one waiter: all four are held again once they ran
        wait_for(lambda: link.fg + link.bg == 4, DEADLINE, "the slots freed so far to be taken")
        n = 2 if released % 3 == 0 else 1  # two at once (before either waiter runs), or one
        with link._cond:
            for _ in range(n):
                link.release(link.bg == 0)  # the four first held first, then the waiters' own
        released += n
    for t, done in waiters:
        assert done.wait(DEADLINE), "a stream slept on with a slot free"
        t.join(DEADLINE)
    assert link.fg + link.bg == 4
