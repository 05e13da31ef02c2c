"""The link: how many connections stream at once, who gets the next one, and whether the link itself
(not one connection) is the limit.

Every GET a fetcher sends holds a *slot* from its request until its body is read (or abandoned), so at
most ``capacity`` connections stream at once: the same total as a plain client with that many threads.
A slot goes to a waited-on (foreground) stream before a prefetch one. A reader's object is spread over
the free connections and half of those prefetch streams on (``foreground_share``); when its parts
wait for slots, prefetch streams give theirs up at their next chunk, one per part waiting (their
connections stay open and idle; they take a slot again when one is free): the reader's object gets
connections at once and prefetch keeps the others busy.

Pausing *all* prefetch for a reader is right only when the link is the limit, and that is measured, not
assumed: each window of ``WINDOW`` seconds records the bytes moved and the mean number of streams. The
link (or the CPU) is the limit when adding connections stopped adding throughput: a recent window
(``HISTORY``) with at most ``FEWER`` times as many streams moved at least ``SAME`` of what the latest
moved. Then a waiting reader pauses all prefetch, since more prefetch streams would only take bandwidth
from it. (A drop in bytes per stream alone is not enough: streams in their request's round trip, or a
busy CPU, lower it while more connections still add throughput; an early version paused on that and
cost the 1 MiB cell of bench --matrix a quarter of its throughput.)

A verdict of "limited" holds only while there are streams to measure: a window in which on average
fewer than half a stream ran ends it. Otherwise prefetch paused for a reader whose fetch is not
streaming (in its HEAD, say) would keep the link idle and the verdict with it, for ever.

An *early* prefetch (``Waited.early``: one of the first files a job opens, fetched the way a reader's
file is) sits between the two: it holds a prefetch slot and yields to readers like any prefetch, but
other prefetch yields to it and waits while it waits, so the first files come over many connections
instead of one each (the job's first record waits for them) without delaying a reader's object. Among
early streams the job's first file goes first (``Waited.order``): the first record needs the first
file whole, then the next, not all of them at a quarter of the link each. (Holding plain prefetch back
until early files had landed was tried: it made the first record no faster on this 2-core machine,
where the CPU is the limit, and cold epochs up to twice as long; it is now held only until each early
file's GETs are answered, by the daemon's hand-out.)

A prefetch promoted while it runs (``Waited.foreground`` turned True: a reader now waits on it) is one of
``readers``: it neither yields for readers nor waits for them, since it would be waiting on itself. It
keeps the kind of slot it took (a promotion changes whom it yields to, not what it holds), so each
release matches its acquire.

Wakes: every stream waiting in ``acquire`` that may take a slot is woken by the change that lets it (a
slot released or given up, a promotion, a reader's stream taking its slot, an early stream's turn, the
last reader's fetch ending, the verdict changing); ``POLL`` only closes idle windows. A new waiter wakes
nobody: it only makes the others' conditions stricter. Readers' streams wait on a condition of their
own, and a freed slot wakes one of them per free slot (any may take it); the last to take its slot
passes slots still free on to prefetch. Plain prefetch is woken the same way when only it waits and
nothing holds it back; otherwise every prefetch waiter re-checks its own condition (rank, file order,
promotion). Waking every waiter on each release was 5-10 waits per release with 16 MiB objects (a few
ms of CPU per GB, below what two runs of the same code differ by) and one wait for a whole 256 MiB
object, whose CPU goes elsewhere (docs/how-it-works.md, "Where the CPU goes").

Invariants: ``0 <= fg + bg <= capacity`` at all times (a slot is taken under the lock, only when free);
``fg_waiting`` counts foreground streams blocked in ``acquire``, ``early_waiting`` early ones,
``handoff`` the slots prefetch gave up for readers' streams and they have not taken yet (exactly:
``handoff <= fg_waiting``), ``early_handoff`` those given up for early streams (at most
``early_waiting``); a prefetch stream that is not promoted yields only while more streams of a higher
rank wait than have been handed a slot (one per waiting part) or while a reader waits on a saturated
link; a promoted one waits only for a free slot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Protocol

WINDOW = 0.5  # seconds per throughput sample
HISTORY = 20  # windows remembered (10 s)
FEWER = 0.6  # a window with at most this share of the streams ...
SAME = 0.9  # ... that moved at least this share of the bytes/s: more connections stopped helping
POLL = 0.5  # seconds a waiting stream sleeps at most: closes idle windows; every wake is notified besides


class Waited(Protocol):
    """A fetch's priority as the link reads it: ``foreground`` is True while a reader waits on the fetch,
    and may turn True while one of its streams waits for a slot (a promotion)."""

    foreground: bool


def _early(waited: Waited | None) -> bool:
    return bool(getattr(waited, "early", False))


def _order(waited: Waited | None) -> int:
    return getattr(waited, "order", 0)


class Link:
    def __init__(self, capacity: int, cancel: threading.Event | None = None, clock=time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"a link needs at least one connection, got {capacity}")
        self.capacity = capacity
        self.cancel = cancel or threading.Event()
        self._clock = clock
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # prefetch streams (early or not) wait on it
        self._fg_cond = threading.Condition(lock)  # readers' streams wait on this one
        self.fg = 0  # slots held by foreground streams
        self.bg = 0  # slots held by prefetch streams
        self.fg_waiting = 0
        self.early_waiting = 0  # early prefetch streams blocked in acquire (plain prefetch yields to them)
        self._early_orders: dict[int, int] = {}  # order -> early streams of that order waiting
        self.handoff = 0
        self.early_handoff = 0  # slots plain prefetch gave up for early streams, not taken yet
        self._readers = 0  # foreground fetches in flight (``readers``, set by the fetcher)
        self.peak = 0
        self.yields = 0  # times a prefetch stream gave its slot up, for tests and status
        # throughput windows
        self._w_start = clock()
        self._w_bytes = 0
        self._w_area = 0.0  # integral of streams over the window
        self._w_last = self._w_start
        self.history: deque[tuple[float, float]] = deque(maxlen=HISTORY)  # (mean streams, bytes/s)
        self.per_stream = 0.0  # best bytes/s one stream reached in a window, for status
        self.rate = 0.0  # bytes/s of the last window
        self.streams = 0.0  # mean streams of the last window
        self.limited = False

    # -- slots ---------------------------------------------------------------------------------------

    def _tick(self) -> None:
        """Account the time since the last change at the current stream count (lock held)."""
        now = self._clock()
        self._w_area += (self.fg + self.bg) * (now - self._w_last)
        self._w_last = now
        span = now - self._w_start
        if span >= WINDOW:
            self.streams = self._w_area / span
            self.rate = self._w_bytes / span
            if self.streams >= 0.5:
                per = self.rate / self.streams
                self.per_stream = max(per, self.per_stream * 0.98)  # slowly forgets an old best
            was = self.limited
            if self.streams < 0.5:  # the link was idle: nothing measured says it is the limit now
                self.limited = False
            elif self.streams >= 2:  # one stream says nothing about the link: keep the last verdict
                self.limited = any(n <= FEWER * self.streams and r >= SAME * self.rate for n, r in self.history)
            if self.limited != was:  # whether prefetch is held for readers changed: it re-checks
                self._cond.notify_all()
            if self.streams >= 0.5:
                self.history.append((self.streams, self.rate))
            self._w_start, self._w_bytes, self._w_area = now, 0, 0.0

    def acquire(self, foreground: bool, waited: Waited | None = None) -> None:
        """Take a slot (blocking); a foreground stream goes first and makes prefetch streams yield.

        ``waited``: the prefetch's priority, read again while it waits; once promoted it waits only for
        a free slot (it is one of the readers prefetch would otherwise wait for)."""
        with self._cond:
            if foreground:
                # No wake here: streams check whether to yield between chunks (``should_yield``), not on
                # this condition, and a new waiter only makes the others' conditions stricter.
                self.fg_waiting += 1
                try:
                    while self.fg + self.bg >= self.capacity:
                        self._wait(self._fg_cond)
                    self._tick()
                    self.fg += 1
                finally:
                    self.fg_waiting -= 1
                    self.handoff = min(self.handoff, self.fg_waiting)
                    if self.fg + self.bg < self.capacity:
                        # Slots still free (two released before this stream ran, or it was cancelled) go
                        # to the next reader's stream, or to prefetch held back for readers' streams.
                        self._freed()
            elif _early(waited):
                order = _order(waited)
                self.early_waiting += 1
                self._early_orders[order] = self._early_orders.get(order, 0) + 1
                try:
                    while self.fg + self.bg >= self.capacity or (
                            (self._bg_held() or min(self._early_orders) < order) and not _promoted(waited)):
                        self._wait()
                finally:
                    self.early_waiting -= 1
                    self._early_orders[order] -= 1
                    if not self._early_orders[order]:
                        del self._early_orders[order]
                    self.early_handoff = min(self.early_handoff, self.early_waiting)
                    self._cond.notify_all()  # a later early stream may take a slot still free
                self._tick()
                self.bg += 1
            else:
                while self.fg + self.bg >= self.capacity or (
                        (self._bg_held() or self.early_waiting) and not _promoted(waited)):
                    self._wait()
                self._tick()
                self.bg += 1
            self.peak = max(self.peak, self.fg + self.bg)

    def release(self, foreground: bool) -> None:
        with self._cond:
            self._tick()
            if foreground:
                self.fg -= 1
            else:
                self.bg -= 1
            self._freed()

    def _wait(self, cond: threading.Condition | None = None) -> None:
        if self.cancel.is_set():
            from .retry import Cancelled

            raise Cancelled("stopping")
        (cond or self._cond).wait(POLL)
        self._tick()  # time passes while everyone waits: an idle window must close (and end "limited")

    def _freed(self) -> None:
        """Slots came free (lock held): wake as many waiters as may take them. Readers' streams first,
        one per free slot (any of them may take one; a notified waiter leaves the queue, so a slot freed
        before it ran wakes another); once none waits, the last to take its slot passes the slots still
        free on (``acquire``). Plain prefetch alike when only it waits and nothing holds it back;
        otherwise prefetch waiters' conditions differ (rank, file order, promotion): each re-checks."""
        free = self.capacity - self.fg - self.bg
        if free <= 0:
            return
        if self.fg_waiting:
            self._fg_cond.notify(free)
        elif self.early_waiting or self._bg_held():
            self._cond.notify_all()
        else:
            self._cond.notify(free)

    def wake(self) -> None:
        """Something a waiting stream depends on changed outside the lock (a promotion): re-check now."""
        with self._cond:
            self._fg_cond.notify_all()
            self._cond.notify_all()

    @property
    def readers(self) -> int:
        """Foreground fetches in flight (set by the fetcher). Prefetch waits for none of them to be in
        flight while the link is limited, so the last one ending wakes it."""
        return self._readers

    @readers.setter
    def readers(self, n: int) -> None:
        with self._cond:
            fewer = n < self._readers
            self._readers = n
            if fewer and not n:
                self._cond.notify_all()

    def _bg_held(self) -> bool:
        """Whether prefetch must not stream now (lock held)."""
        return self.fg_waiting > 0 or (self._readers > 0 and self.limited)

    def _early_above(self, waited: Waited | None) -> int:
        """Early streams that ``waited``'s gives way to waiting for a slot (lock held): every one for
        plain prefetch, those of an earlier file for an early one."""
        if not _early(waited):
            return self.early_waiting
        order = _order(waited)
        return sum(n for o, n in self._early_orders.items() if o < order)

    def should_yield(self, waited: Waited | None = None) -> bool:
        """For a prefetch stream between chunks: give the slot up now? (Cheap when nobody waits.) Never
        once the prefetch is promoted: a reader waits on it. An early prefetch yields to readers and to
        early prefetch of an earlier file; plain prefetch to early prefetch as well."""
        if _promoted(waited) or not (self.fg_waiting or self.early_waiting or (self._readers and self.limited)):
            return False
        with self._cond:
            if self._readers and self.limited:
                return True
            if self.fg + self.bg < self.capacity:
                return False
            # Counted apart: early parts may wait for long (a link full of plain prefetch), and counting
            # them with readers' parts kept a stale handoff that stopped streams yielding to the next
            # reader (a reader's 4 MiB object waited 3 s for a 16 MiB part to end).
            return self.fg_waiting > self.handoff or self._early_above(waited) > self.early_handoff

    def pause(self, waited: Waited | None = None) -> None:
        """A prefetch stream gives its slot up and takes one again when prefetch may stream (or, once
        ``waited`` is promoted, when a slot is free)."""
        with self._cond:
            self.yields += 1
            self._tick()
            self.bg -= 1
            if self.fg_waiting > self.handoff:
                self.handoff += 1
            elif self._early_above(waited) > self.early_handoff:
                self.early_handoff += 1
            self._freed()
        self.acquire(False, waited)

    def moved(self, n: int) -> None:
        """``n`` body bytes arrived on some stream. No lock: this runs per chunk on every stream, and an
        update lost to a race only makes one window's estimate a chunk short; windows close in
        ``acquire``/``release``."""
        self._w_bytes += n

    def free(self) -> int:
        """Slots neither held nor about to be taken by a waiting reader's (or early) stream."""
        with self._cond:
            return max(0, self.capacity - self.fg - self.bg - self.fg_waiting - self.early_waiting)

    def foreground_share(self, holding: bool) -> int:
        """Connections a waited-on object may spread over: the free ones, half of those prefetch streams
        on (they yield to it), and its own first GET's when it ``holding`` it."""
        with self._cond:
            free = self.capacity - self.fg - self.bg
            return max(1, free + self.bg // 2 + (1 if holding else 0))

    def status(self) -> dict:
        with self._cond:
            return {"streams": self.fg + self.bg, "capacity": self.capacity, "limited": self.limited,
                    "rate": round(self.rate), "per_stream": round(self.per_stream), "yields": self.yields}


def _promoted(waited: Waited | None) -> bool:
    return waited is not None and waited.foreground


class Slot:
    """One GET's slot on the link: taken before the request, given back once (when its body is read,
    closed, or the request failed). Remembers the kind it took, as a promotion may change the fetch's."""

    __slots__ = ("link", "foreground", "held")

    def __init__(self, link: Link, waited: Waited) -> None:
        self.link, self.foreground = link, waited.foreground
        link.acquire(self.foreground, waited)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.link.release(self.foreground)
