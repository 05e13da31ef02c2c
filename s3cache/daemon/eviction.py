"""Admission and eviction: making room for a download, for ``Space`` (space.py), which takes this in as a
mixin (like leasing.py, pins.py and room.py). Reserving a download's bytes under ``--max-size`` and on the
filesystem, choosing victims by policy (``policy.evict.choose_victims``) when they do not fit, evicting
for a full filesystem or a smaller ``--max-size`` (SIGHUP), and taking a corrupt file out of readers'
reach. The only place files are evicted.

Invariants it keeps:

* ready bytes + reserved bytes never exceed ``--max-size``: ``admit`` reserves before a byte is written
  (``commit``, in space.py, turns the reservation into ready bytes in one step under the state lock).
  A second ``admit`` of a URI with another size (the object changed in S3 since its size was learned)
  admits the new size again, so a reservation is always the size that will be published; of the same
  URI and size it is a no-op that answers yes (one reservation per URI);
* reserved bytes also fit in the filesystem: ``admit`` counts its free bytes less every reservation
  (``disk_room``: a reservation whose file is already allocated counts twice, erring towards fewer
  parallel downloads, never towards a full disk), less ``--min-free`` for prefetch;
* a prefetch beyond the readahead window (``window``) evicts nothing, however the scan found room;
* a reader waiting on an object always progresses while anything cached is needed later than it:
  demand may evict any file not leased, pinned or being read (``choose_victims`` with ``demand``);
* a file is removed before its index row (a crash leaves a row to drop at start, never an orphan);
* a file a reader resolved is seen by eviction: it holds the lease lock exclusively and applies every
  usage note readers sent (``drain_notes``, in the order sent) before choosing victims;
* the lease ``flock`` is taken BEFORE the state lock (``exclusive``), never after: readers hold it
  shared around their fast path, and taking it after the state lock would let a reader block the daemon.

Uses the attributes ``Space`` sets (``s``, ``store``, ``index``, ``catalog``, ``ready``, ``used``,
``reserved``, ``reservations``, ``quarantine_bytes``, ``min_free_reached``, ``evicted``,
``evicted_bytes``, ``_cond``, ``_lease``, ``_tracker``, ``_drain_notes``, ``_on_evicted``) and its
``_reserve``, ``disk_room``, ``window``, ``forget``, ``prune_quarantine``, ``is_pinned``, ``leased_now``
and ``_refused``. ``admit``, ``evict_for_disk``, ``fit_max_size`` and ``exclusive`` take the locks
themselves; ``withdraw`` is called inside ``exclusive()``. Imports no daemon part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from s3cache.manifest.parse import Entry
from s3cache.policy.evict import Resident, choose_victims, target_distance
from s3cache.service.config import human_size
from s3cache.store.index import Record

log = logging.getLogger("s3cache.daemon")


class Eviction:
    """Admission and eviction for ``Space`` (a mixin: see the module doc)."""

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The lease lock exclusively, then the state lock: no reader is between "saw the file" and
        "told us" while this is held. The lock order (flock first) is the daemon's rule."""
        # One holder per process: flock belongs to the open file description that every daemon thread
        # shares, so a second thread's LOCK_EX would succeed at once and the first one's LOCK_UN would then
        # leave it evicting unprotected while readers resolve. The mutex makes the hold exclusive.
        with self._lease.held():
            with self._cond:
                yield

    def apply_notes(self) -> None:
        """Apply every usage note readers sent so far (inside ``exclusive()``: then no reader is between
        seeing a file and telling us, so every file handed out before now holds its lease)."""
        self._drain_notes()

    def admit(self, entry: Entry, size: int, demand: bool) -> bool:
        """Reserve ``size`` bytes for ``entry`` under --max-size and on the filesystem, evicting by
        policy if needed. False: no room yet (``waits`` says what holds it). A URI already reserved
        with another size (the object changed in S3) is admitted again for the new size."""
        uri = entry.uri
        with self._cond:
            have = self.reservations.get(uri)
            if have == size:
                return True
            if have is not None:
                log.info("%s is %s now, not the %s reserved for it: admitting it again", uri,
                         human_size(size), human_size(have))
                # The reservation only: readers waiting on it keep the leases it starts when it lands
                self.reserved -= self.reservations.pop(uri)
            if size > self.s.max_size:
                return False
            if self._need(size, demand)[0] <= 0:
                self._reserve(uri, size)
                if not demand:
                    self.min_free_reached = False
                return True
        with self.exclusive():
            self._drain_notes()
            need, disk_short = self._need(size, demand)
            if need <= 0:
                self._reserve(uri, size)
                return True
            now = time.time()
            n = len(self.catalog)
            fut = self._tracker.future(n)  # its own, monotonic clock: readers go silent over a duration
            target = target_distance(self.catalog.position(uri), demand, fut, n)
            low = int(self.s.max_size * self.s.low_watermark)
            extra = max(0, self.used + self.reserved + self.quarantine_bytes + size - low - need)
            # The cached copy of ``uri`` itself only once superseded (no longer handed out), held then by
            # readers' leases and a pin, not by a reader's position (the new version's): else a new
            # version that fits only in its place never would.
            residents = [r for r in self.residents() if r.uri != uri]
            own = self.ready.get(uri)
            if own is not None and own.superseded:
                residents.append(Resident(uri, own.size, own.last_used, own.fetched_at, None, self.is_pinned(uri)))
            victims = choose_victims(residents, need=need, extra=extra,
                                     readers=fut.ordered, n=n,
                                     target_distance=target, demand=demand, now=now, lease=self.s.lease,
                                     protected=self._tracker.current(), future=fut,
                                     held=self.leased_now(), window=self.window())
            if victims is None:
                self._refused(uri, size, need, demand, disk_short, fut, target, now)
                return False
            self._evict(victims, uri)
            self._reserve(uri, size)
            if not demand:
                self.min_free_reached = False
            return True

    def _need(self, size: int, demand: bool) -> tuple[int, bool]:
        """(bytes to evict before ``size`` fits, whether the filesystem rather than --max-size is short)."""
        over = self.used + self.reserved + self.quarantine_bytes + size - self.s.max_size
        short = size - self.disk_room(demand)
        return max(over, short), short > over

    def evict_for_disk(self, size: int) -> bool:
        """The filesystem is full: evict files nobody needs soon to free ``size`` bytes. True if done."""
        with self.exclusive():
            self._drain_notes()
            now = time.time()
            n = len(self.catalog)
            fut = self._tracker.future(n)  # its own, monotonic clock: readers go silent over a duration
            victims = choose_victims(self.residents(), need=size, extra=0, readers=fut.ordered, n=n,
                                     target_distance=None, demand=False, now=now, lease=self.s.lease,
                                     protected=self._tracker.current(), future=fut,
                                     held=self.leased_now())
            if not victims:
                return False
            self._evict(victims, "a full filesystem")
            return True

    def fit_max_size(self) -> int:
        """After a SIGHUP made ``--max-size`` smaller: evict by policy (as for a waiting reader: anything
        not pinned, leased or being read) until ready + reserved bytes are within it again, at once rather
        than at later admissions. Bytes leases, pins, files being read and downloads already admitted
        hold stay (they go as those end: admission evicts down to the bound). Takes the locks itself;
        returns the bytes still above ``--max-size``."""
        with self.exclusive():
            self.prune_quarantine()  # its budget is a share of --max-size too
            self._drain_notes()
            over = self.used + self.reserved + self.quarantine_bytes - self.s.max_size
            if over <= 0:
                return 0
            n = len(self.catalog)
            fut = self._tracker.future(n)
            victims = choose_victims(self.residents(), need=over, extra=0, readers=fut.ordered, n=n,
                                     target_distance=None, demand=True, now=time.time(), lease=self.s.lease,
                                     protected=self._tracker.current(), future=fut,
                                     held=self.leased_now(), partial=True)
            if victims:
                self._evict(victims, f"a smaller --max-size ({human_size(self.s.max_size)})")
            left = self.used + self.reserved + self.quarantine_bytes - self.s.max_size
            log.info("--max-size is %s now: evicted %d file(s) (%s)%s", human_size(self.s.max_size),
                     len(victims or ()), human_size(sum(v.size for v in victims or ())),
                     f"; {human_size(left)} above it held by leases, pins, readers and downloads" if left > 0 else "")
            return max(0, left)

    def _evict(self, victims: list[Resident], why: str) -> None:
        """Remove victims' files, then their rows (both locks held)."""
        for v in victims:
            rec = self.forget(v.uri)
            if rec is not None:
                self.store.remove(rec.path)  # the file first: a crash leaves a row to drop, not an orphan
            self.evicted += 1
            self.evicted_bytes += v.size
        self.index.delete_many(v.uri for v in victims)
        self._on_evicted(victims)
        log.debug("evicted %s (%s) for %s", [v.uri for v in victims], human_size(sum(v.size for v in victims)), why)

    def withdraw(self, uri: str, rec: Record, quarantine: bool) -> tuple[bool, str | None, str | None]:
        """Take the ready file ``rec`` out of readers' reach: quarantine it or remove it, and only then
        forget it and drop its row. Call inside ``exclusive()``. Returns (done, quarantine path, error).

        Not done (False, None, None) when ``uri``'s file is no longer the one ``rec`` describes (same
        path, same fetch, same bytes): it was replaced or evicted meanwhile. A file that cannot be
        quarantined is removed instead (a corrupt file must not stay readable); if that fails too the
        entry is kept and the error returned (the caller reports it)."""
        cur = self.ready.get(uri)
        if cur is None or (cur.path, cur.fetched_at, cur.crc32c) != (rec.path, rec.fetched_at, rec.crc32c):
            return False, None, None
        try:
            where, error = self.store.take_out(rec.path, quarantine)
        except OSError as e:
            log.error("cannot take %s out of readers' reach: %s; it stays", rec.path, e)
            return False, None, f"could not quarantine or remove it: {e.strerror or e}"
        if error:
            log.error("%s: %s", rec.path, error)
        if where:
            self.prune_quarantine()
        self.forget(uri)
        self.index.delete_many([uri])
        return True, where, error

    def residents(self) -> list[Resident]:
        return [Resident(u, r.size, r.last_used, r.fetched_at, self.catalog.position(u), self.is_pinned(u))
                for u, r in self.ready.items()]

