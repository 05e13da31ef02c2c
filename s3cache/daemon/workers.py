"""The workers: take a job from the schedule, get it room in the space, fetch it, hand it on.

One ``run`` per worker thread (``threads`` of them: half of them kept for readers' objects, see
``Schedule.next_job``). It owns no state: every outcome of a fetch is routed to the part whose
state it changes — a verified file to the publisher (``publish``), a failure to ``fail``, no room to
the schedule (blocked) with the size learned by the space, a full disk to eviction for the filesystem
or to the schedule (parked) — so that each of those decisions is made in one place.

Invariants it keeps:

* every job handed out ends in exactly one of: published, failed, blocked, parked, re-queued, or
  cancelled at shutdown; in every case it leaves the fetching set, and a reservation it took is
  released (or turned into ready bytes by the publisher);
* a reader waiting on a job makes it a foreground fetch (smaller parts, ahead of prefetch); the first
  files of each job, and a reader's next files it hinted before a manifest listed them, are fetched
  *early*: behind readers, ahead of other prefetch, each over its share of the connections so that
  together they fill them (``_early``), and no other prefetch is handed out until each of their GETs
  has been answered (``Schedule.asked``);
* an error while routing an outcome (eviction for a full disk failing on a full index, say) never ends
  the worker: it is counted in ``errors`` (status's ``loop_errors``) and the job is parked or failed;
* ``disk_full_pauses`` counts the times the filesystem filled (disk full went from False to True).

Lock: the daemon's state ``threading.Condition`` (see space.py), taken briefly to route an outcome;
never held across a fetch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from s3cache.errors import ChecksumMismatch, FetchFailed, ObjectChanged
from s3cache.fetch.fetcher import Cancelled, DiskFull, Fetched, Fetcher, NeedSpace
from s3cache.fetch.parts import Early
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import shown
from s3cache.service.config import Settings
from s3cache.service.metrics import FetchHistogram

from .schedule import Schedule
from .space import Space
from .supervise import LoopErrors

log = logging.getLogger("s3cache.daemon")


class Workers:
    def __init__(self, settings: Settings, schedule: Schedule, space: Space, fetcher: Fetcher,
                 cond: threading.Condition, *, is_waited: Callable[[str], bool],
                 publish: Callable[[Entry, Fetched], None], fail: Callable[[str, str, str], None],
                 histogram: FetchHistogram | None = None, errors: LoopErrors | None = None) -> None:
        self.s = settings
        self._schedule = schedule
        self._space = space
        self._fetcher = fetcher
        self._cond = cond
        self._is_waited = is_waited
        self._publish = publish
        self._fail = fail
        self._histogram = histogram
        self._errors = errors or LoopErrors()
        self.disk_full_pauses = 0  # state lock

    @property
    def threads(self) -> int:
        """Worker threads to run: ``workers`` for prefetch and as many again kept for readers' objects
        (the schedule hands at most ``workers`` jobs no reader waits on out at once). Threads, not
        connections: the link still lets at most ``workers`` GETs stream at once."""
        return 2 * self.s.workers

    def run(self) -> None:
        """One worker thread: until the schedule says stop."""
        while True:
            job = self._schedule.next_job()
            if job is None:
                return
            entry, demand = job
            try:
                if not self._one(entry, demand):
                    return
            except Exception as e:
                # Not a fetch error (those are routed in _one): routing the outcome failed. The job
                # must still end: it fails, visibly, and this worker takes the next one.
                self._errors.record("workers", e, f"fetching {shown(entry.uri)}")
                self._give_up(entry, e)

    def _one(self, entry: Entry, demand: bool) -> bool:
        """Fetch one job and route its outcome. False: the daemon is stopping."""
        uri = entry.uri
        space = self._space
        size = entry.size
        if size is None:  # the lock only for what the space learned (one fewer to take per object)
            with self._cond:
                size = space.size_hint(uri)
        try:
            if size is not None and not space.admit(entry, size, demand):
                raise NeedSpace(size)
            # Foreground while a reader waits: files a reader will want next ("ahead") come through
            # the demand queue too, and must not compete with the one it waits on.
            with self._cond:
                foreground = demand and self._is_waited(uri)
                early = None if foreground else self._early(uri)
                if early is None:  # a reader came since the hand-out: its fetch holds nothing back
                    self._schedule.asked(uri)
            started = time.monotonic()
            fetched = self._fetcher.fetch(entry, lambda n: space.admit(entry, n, demand), foreground=foreground,
                                          early=early)
            if self._histogram is not None:
                self._histogram.record_fetch(time.monotonic() - started, fetched.size)
        except NeedSpace as e:
            if e.size > self.s.max_size:
                self._fail(uri, "TooLarge", f"{e.size} bytes will never fit in --max-size {self.s.max_size}")
                return True
            with self._cond:
                room = space.max_fit(uri)
                if e.size > room:
                    space.learn_size(uri, e.size)
            if e.size > room:  # fails at once with the reason rather than leave a reader waiting for ever
                self._fail(uri, "PinnedFull", f"{e.size} bytes cannot fit while pins hold "
                           f"{self.s.max_size - room} of --max-size {self.s.max_size}: unpin files or "
                           f"raise --max-size (retried with backoff)")
                return True
            with self._cond:
                self._schedule.no_room(uri, demand)
                space.learn_size(uri, e.size)
            return True
        except Cancelled:
            with self._cond:
                self._schedule.ended(uri)
                space.release(uri)
            return False
        except DiskFull as e:
            self._disk_full(entry, demand, e.size, str(e))
            return True
        except FetchFailed as e:
            self._fail(uri, e.code, e.reason)
            return True
        except (ChecksumMismatch, ObjectChanged) as e:
            self._fail(uri, type(e).__name__, str(e))
            return True
        except Exception as e:
            self._errors.record("workers", e, f"fetching {shown(uri)}")
            self._fail(uri, "InternalError", f"{type(e).__name__}: {e}")
            return True
        with self._cond:
            self._schedule.landed(uri)
        self._publish(entry, fetched)
        return True

    def _early(self, uri: str) -> Early | None:
        """How ``uri`` is fetched if the schedule handed it out as one of a job's first files (state lock
        held): its order, and its share of the ``workers`` connections, so that the job's first files
        together fill them, one GET each when they are at least as many (``workers // first_files``, one
        more for the first ``workers % first_files``; a job of fewer objects than ``first_files`` splits
        the connections between those it has: one object alone gets them all); a job's first record waits for all of them
        (demand.FIRST_FILES), and more parts than connections would only add requests. ``asked`` lets
        the schedule hand out other prefetch once every byte of it is asked for."""
        order = self._schedule.early.get(uri)
        if order is None:
            return None
        w, k = self.s.workers, self._schedule.first_count(uri)
        share = max(1, w // k + (order % k < w % k))

        def asked() -> None:
            with self._cond:
                self._schedule.asked(uri)

        return Early(order, share, asked)

    def _give_up(self, entry: Entry, err: Exception) -> None:
        """End a job whose outcome could not be routed: out of the fetching set, its reservation
        released, failed with InternalError (readers waiting on it get the error, not a hang)."""
        try:
            with self._cond:
                self._schedule.ended(entry.uri)
                self._space.release(entry.uri)
            self._fail(entry.uri, "InternalError", f"{type(err).__name__}: {err}")
        except Exception as again:
            self._errors.record("workers", again, f"failing {shown(entry.uri)}")

    def published_on_a_full_disk(self, entry: Entry, size: int) -> None:
        """The publisher found no room for the index's commit (its files took the last of it) and
        discarded the file: the job waits for space as a download that hit a full disk does, rather
        than failing (the publisher thread; takes the state lock)."""
        with self._cond:
            demand = self._is_waited(entry.uri)
        self._disk_full(entry, demand, size, "no room left for the index's commit")

    def _disk_full(self, entry: Entry, demand: bool, size: int, why: str) -> None:
        """A job found the filesystem full: it ends; eviction makes room if it can (the job goes again),
        else prefetch pauses until space returns and the job is parked."""
        uri = entry.uri
        space = self._space
        with self._cond:
            self._schedule.ended(uri)
            space.release(uri)
            space.learn_size(uri, size)
        try:
            evicted = space.evict_for_disk(size)
        except Exception as err:  # the index on the full disk, say: park the job, as with no victims
            self._errors.record("workers", err, f"evicting for {shown(uri)} on a full filesystem")
            evicted = False
        if evicted:
            log.info("%s: %s; evicted files to make room, trying again", shown(uri), why)
            with self._cond:
                self._schedule.again(entry, demand)
            return
        log.error("%s: %s; prefetch paused until space returns", shown(uri), why)
        with self._cond:
            if not space.disk_full:
                self.disk_full_pauses += 1
            space.mark_disk_full(size)
            self._schedule.park(entry, demand)
