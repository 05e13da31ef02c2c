"""The readers: what readers told us (usage notes, wants) and what we owe them (answers, leases).

Owns where each reader is (the ReaderTracker: the only part that moves it), who waits on which object
(``waiters``: ctl connections), usage of files renamed into place but not yet ready, per-epoch hit and
miss counts, and how long readers waited. Handles the ``want`` request and applies ``use.sock`` notes.

Invariants it keeps:

* a reader waiting on an object gets exactly one answer per ``want``: "ready" with the path, or
  "failed" with a code, pushed on its connection (``landed``/``failed``), or its connection closes;
* a file a reader resolved has its lease start no later than the moment the reader could open it: a
  note for a ready file touches its record; a note for a file renamed but not yet ready is kept and
  applied when it becomes ready; a file a reader waits on is leased from the moment it is ready;
* every note is applied in order before the same reader's ``want`` (its position moves in order).

Lock: the daemon's state ``threading.Condition`` (see space.py for why one lock), held by the caller of
every method except ``want`` and ``closed``, which take it. Answers are written to readers' sockets
only through ``_tell`` (today under that lock; the one place to change to queue them instead).

Talks to the schedule and the space below it directly; gets readers' notes through ``notes()`` and
promotes an in-flight fetch through ``promote(uri)``, callables handed at construction. Answers
``order``, ``order_list`` and ``explain`` through the ``Announced`` mixin (announce.py); holds wants
outside the scope while the manifest is being edited through the ``Parked`` mixin (parked.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable

from s3cache.errors import OutOfScope, RequestTooLarge, S3CacheError
from s3cache.manifest.jobs import Jobs, JobStats
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef, from_identity
from s3cache.manifest.scope import Scope
from s3cache.policy.tracker import ReaderTracker
from s3cache.reader import wire
from s3cache.sockets.control import Connection
from s3cache.store.files import Store
from s3cache.store.index import Record

from .announce import MAX_READERS, MAX_URI_CHARS, Announced
from .demand import FIRST_FILES, OutsideDemand
from .parked import Parked
from .schedule import Schedule
from .space import Space

log = logging.getLogger("s3cache.daemon")

MAX_AHEAD = wire.MAX_AHEAD  # ahead hints in one want; the server refuses more (TooMany) before we see it
EPOCHS_KEPT = 16  # per-epoch hit counts kept (and shown in status): the most recent epoch numbers


class Readers(Announced, Parked):
    def __init__(self, schedule: Schedule, space: Space, store: Store, cond: threading.Condition,
                 tracker: ReaderTracker, *, notes: Callable[[], Iterable[tuple[str, str, str]]],
                 promote: Callable[[str], object], scope: Scope | None = None,
                 manifest_edited: Callable[[], bool] = lambda: False) -> None:
        self._schedule = schedule
        self._space = space
        self._store = store
        self._cond = cond
        self.tracker = tracker
        self._notes = notes
        self._promote = promote
        self.waiters: dict[str, set[Connection]] = {}
        self._early_use: dict[str, float] = {}  # used by a reader between rename and "ready"
        self.epochs: dict[int, dict[str, int]] = {}  # readers' epoch -> hits and misses
        self._wanted_at: dict[str, float] = {}  # when a reader first started waiting for a file
        self.hits = 0
        self.job_stats = JobStats()  # hits, misses and waits per job of a manifest directory
        self.misses = 0
        self.wait_seconds = 0.0  # waits that ended: the file came, failed, or the reader left
        self.notes_rejected = 0  # usage notes naming no valid s3:// URI, skipped
        # What readers may have fetched (scope.py); None: nothing beyond the manifest and its prefixes.
        self._scope = scope if scope is not None else Scope(has_manifest=True)
        self.out_of_scope = 0  # wants refused as out of scope since start
        self._edited = manifest_edited  # the manifest on disk differs from the one installed
        self._parked: dict[str, tuple[ObjectRef, float, set[Connection]]] = {}  # wants waiting for that edit
        self.hints_out_of_scope = 0  # ahead hints dropped as out of scope since start
        self.outside = OutsideDemand()  # waits on objects the manifest does not list, capped (demand.py)
        warning = self._scope.warning()
        if warning:
            log.warning("%s", warning)

    def install(self, jobs: Jobs | None = None, moved: Callable[[int], int | None] | None = None) -> None:
        """A new manifest (of these jobs, for a manifest directory): ``moved(p)``, where the old one's
        position ``p`` is now, carries readers and their orders over; without it they are forgotten."""
        if moved is None:
            self.tracker.forget()
        else:
            self.tracker.remap(moved)
        self.tracker.jobs = jobs
        self.job_stats.install(jobs)

    def is_waited(self, uri: str) -> bool:
        return bool(self.waiters.get(uri))

    # == usage notes ==================================================================================

    def note_use(self, reader: str, uris: list[str], hit: bool | list[bool]) -> None:
        """A reader resolved these URIs, in this order; ``hit`` (one for all, or one per URI): they were
        there when it first looked, which counts as a cache hit in the reader's current epoch.
        ``reader`` is ``claimed/holder`` from the sockets (usage_socket.lease_name): the position and
        epoch are the claimed reader's, the lease the holder's (``uid:pid`` from SO_PEERCRED, then
        ``|thread``: leases.py), so a process holds its newest files however many made-up ids it uses."""
        hits = [hit] * len(uris) if isinstance(hit, bool) else hit
        now = time.time()
        catalog = self._schedule.catalog
        n = len(catalog)
        moved = False
        reader, _, holder = reader.partition("/")  # positions per claimed reader, leases per process
        holder = holder or reader
        if reader not in self.tracker.ids():
            self.tracker.make_room(MAX_READERS - 1)  # before adding one  # spoofed reader ids cost bounded memory
        for uri, is_hit in zip(uris, hits):
            if not _valid(uri):  # checked before any lookup: notes come from any member of the group
                self.notes_rejected += 1
                continue
            # A holder is kept for a file not ready only if it is coming (Space._awaited is bounded
            # by what is fetched or waited on, not by what readers name).
            coming = self._schedule.is_fetching(uri) or uri in self.waiters or self._schedule.demand.has(uri)
            if not self._space.touch(uri, now, holder if coming or self._space.is_ready(uri) else "") \
                    and self._schedule.is_fetching(uri):
                # Renamed into place but not yet marked ready: the reader already has it. Its lease
                # must start now, or the file could be evicted the moment it becomes ready.
                self._early_use[uri] = now
            pos = catalog.position(uri)
            epoch = self.tracker.epoch_of(reader)
            if pos is not None:
                epoch = self.tracker.saw(reader, pos, n)
                moved = True
            if is_hit:
                self.hits += 1
                self.job_stats.add(pos, hits=1)
                self._epoch(epoch)["hits"] += 1
        if moved:
            self._schedule.reconsider()

    def _epoch(self, epoch: int) -> dict[str, int]:
        counts = self.epochs.get(epoch)
        if counts is None:
            counts = self.epochs[epoch] = {"hits": 0, "misses": 0}
            if len(self.epochs) > EPOCHS_KEPT:  # only recent epochs: a reader can make up any number
                del self.epochs[min(self.epochs)]
        return counts

    def drain(self) -> None:
        """Apply every usage note readers have sent so far."""
        # Runs of one reader's notes, in the order sent: the lease keeps each reader's newest files,
        # so notes must reach it in the reader's order (grouping by reader and kind put a hit sent
        # after a wait before it). One call per run, whatever the kinds: each call may wake the
        # workers to scan again.
        uris: list[str] = []
        hits: list[bool] = []
        who: str | None = None
        for reader, kind, uri in self._notes():
            if reader != who:
                if who is not None:
                    self.note_use(who, uris, hits)
                who, uris, hits = reader, [], []
            uris.append(uri)
            hits.append(kind == "h")
        if who is not None:
            self.note_use(who, uris, hits)

    # == wants and answers ============================================================================

    def want(self, conn: Connection, reader: str, uris: list[str], ahead: list[str] = (), *,
             counted: bool = True) -> list[dict]:
        """A reader waits for ``uris`` (they go to the front of the queue) and will soon want ``ahead``.
        ``counted`` False (a peer host's ask): no reader is noted (no position, epoch or lease), no miss
        and no wait counted; the fetch and its answer are as for a reader.

        ``ahead`` is a hint for objects the manifest does not list (for listed ones the readahead policy
        already knows what comes next): they are queued behind the demand, with no one waiting yet. At
        most MAX_AHEAD of them (more raises RequestTooLarge, and nothing is done). An object that failed
        for good is answered ``failed`` at once, without a download (failures.py says which). An object
        not cached and outside the demand scope (scope.py) is answered ``failed`` with code OutOfScope
        and the rule, without any request to S3: at once, unless the manifest is being edited (then it
        is parked until the edit is in force, ``rejudge_parked``); an ahead hint outside it is dropped.
        """
        if len(ahead) > MAX_AHEAD:
            raise RequestTooLarge(f"{len(ahead)} ahead hints in one want; at most {MAX_AHEAD}: send fewer")
        log.debug("want %s (then %d more) from %s", uris, len(ahead), reader)
        # Parsing is the per-URI work: do it before taking the state lock.
        parsed: list[ObjectRef | S3CacheError] = []
        for raw in uris:
            try:
                parsed.append(from_identity(raw))
            except S3CacheError as e:
                parsed.append(e)
        hints: list[ObjectRef] = []
        for raw in ahead:
            try:
                hints.append(from_identity(raw))
            except S3CacheError:
                continue
        results = []
        front: list[Entry] = []
        promoted = 0  # prefetches in flight this want made a reader's
        edited = functools.cache(self._edited)  # a stat (a listing for a directory): once a want at most
        with self._cond:
            if counted:
                self.drain()  # the reader's earlier notes first, so its position moves in order
                # A superseded copy is not handed out: a want for it waits for the refetch, a miss.
                missed = [u for u in uris if not self._space.is_ready(u) or self._space.ready[u].superseded]
                misses = len(missed)
                self.misses += misses
                for u in missed if self.job_stats.jobs else ():
                    self.job_stats.add(self._schedule.catalog.position(u), misses=1)
                self._epoch(self.tracker.epoch_of(reader.split("/", 1)[0]))["misses"] += misses
            for raw, ref in zip(uris, parsed):
                if isinstance(ref, S3CacheError):
                    results.append({"uri": raw, "state": "invalid", "message": str(ref)})
                    continue
                uri = ref.uri
                path = self._space.ready_path(uri)
                if path is not None:
                    results.append({"uri": uri, "state": "ready", "path": path})
                    continue
                # Checked after "ready": a cached file is on disk, readable by the group already.
                if not self._scope.allows(ref, self._schedule.catalog):
                    if self._park(ref, conn, edited):
                        results.append({"uri": uri, "state": "pending"})
                        continue
                    self.out_of_scope += 1
                    results.append({"uri": uri, "state": "failed", "code": OutOfScope.code,
                                    "message": self._scope.rule()})
                    continue
                failure = self._schedule.permanent_failure(uri)
                if failure is not None:
                    results.append({"uri": uri, "state": "failed", "code": failure.code,
                                    "message": failure.message})
                    continue
                if self._schedule.catalog.position(uri) is None:
                    why = self.outside.admit(conn, uri)
                    if why is not None:
                        results.append({"uri": uri, "state": "failed", "code": wire.E_TOO_MANY, "message": why})
                        continue
                promoted += self._wait_on(ref, {conn}, front, timed=counted)
                results.append({"uri": uri, "state": "pending"})
            self._schedule.push_front(front)
            # After the waits are set up, so the reader's lease on each pending file starts when it lands.
            if counted:
                self.note_use(reader, uris, hit=False)
                holder = reader.partition("/")[2] or reader  # as note_use names it
                for uri in uris:  # the leases owed on files not ready this want took end when conn closes
                    if conn in self.waiters.get(uri, ()):
                        self._space.owe_to(conn, holder, uri)
            for rank, ref in enumerate(hints, 1):  # rank: its place after the file(s) waited on
                if self._scope.allows(ref, self._schedule.catalog):
                    self._schedule.hint(ref, rank if rank < FIRST_FILES else None)
                else:
                    self.hints_out_of_scope += 1
            # The queued entries woke a worker each (push_front, hint); one more for each prefetch now
            # waited on, whose slot queued hints or prefetch may fill (``Schedule.wake``: not every idle
            # worker; one for two promotions left the second hint to the idle poll).
            if promoted:
                self._schedule.wake(promoted)
        return results

    def _wait_on(self, ref: ObjectRef, conns: set[Connection], front: list[Entry],
                 since: float | None = None, timed: bool = True) -> bool:
        """``conns`` wait for ``ref`` (since ``since``, monotonic): queued at the front (``front``) or,
        if prefetching, promoted. True if it was promoted: its prefetch slot is free for another job."""
        entry, in_flight = self._schedule.ask(ref)
        self.waiters.setdefault(ref.uri, set()).update(conns)
        if timed:  # a peer's ask is not a reader waiting: it does not count in wait_seconds
            self._wanted_at.setdefault(ref.uri, time.monotonic() if since is None else since)
        if not in_flight:
            # In the asking uid's lane: uids are served in turn (demand.DemandQueue)
            self._schedule.demand.claim(ref.uri, getattr(next(iter(conns)), "uid", None) if conns else None)
            front.append(entry)
            return False
        self._promote(ref.uri)  # it was prefetching: now a reader waits on it
        return True

    def landed(self, items: list[tuple[str, Record]], now: float) -> None:
        """These files were published and are ready: start leases, answer their waiters."""
        for uri, rec in items:
            used_at = self._early_use.pop(uri, 0.0)
            if self.waiters.get(uri):
                used_at = now  # a reader is about to open it: its lease starts now
            if used_at:
                self._space.touch(uri, used_at)
            conns = self.waiters.pop(uri, ())
            self.outside.done(uri, conns)
            self._tell(conns, {"event": "ready", "uri": uri, "path": rec.path})
            self._stop_waiting(uri)

    def failed(self, uri: str, code: str, message: str) -> None:
        """Fetching ``uri`` failed: answer its waiters."""
        self._early_use.pop(uri, None)
        conns = self.waiters.pop(uri, ())
        self.outside.done(uri, conns)
        self._tell(conns, {"event": "failed", "uri": uri, "code": code, "message": message})
        self._space.forget_owed(uri)  # answered: nobody waits on it for a lease any more
        self._stop_waiting(uri)

    def _tell(self, conns: Iterable[Connection], msg: dict) -> None:
        for conn in conns:
            conn.send(msg)

    def _stop_waiting(self, uri: str) -> None:
        started = self._wanted_at.pop(uri, None)
        if started is not None:
            waited = time.monotonic() - started
            self.wait_seconds += waited
            if self.job_stats.jobs:
                self.job_stats.add(self._schedule.catalog.position(uri), wait=waited)

    def closed(self, conn: Connection) -> None:
        """A reader's ctl connection closed: it waits on nothing any more. A wait that ends so (the
        reader timed out, or was stopped) still counts in ``wait_seconds``. Objects outside the
        manifest it alone waited on leave the demand queue: nobody would read them."""
        with self._cond:
            outside = self.outside.closed(conn)
            for uri in [u for u, (_, _, cs) in self._parked.items() if conn in cs]:
                self._parked[uri][2].discard(conn)
                if not self._parked[uri][2]:
                    del self._parked[uri]
            for uri in [u for u, cs in self.waiters.items() if conn in cs]:
                self.waiters[uri].discard(conn)
                self._space.disown(conn, uri)
                if not self.waiters[uri]:
                    del self.waiters[uri]
                    self._stop_waiting(uri)
            unwanted = {u for u in outside if u not in self.waiters and u not in self._schedule.catalog}
            if unwanted:
                self._schedule.demand.drop(unwanted)

    def status(self) -> dict:
        """This part's piece of ``status`` (state lock held). ``wait_seconds`` includes waits going on."""
        now = time.monotonic()
        waiting = sum(now - t for t in self._wanted_at.values())
        return {
            "readers": len(self.tracker),
            "epochs": [{"epoch": e, **v, "hit_rate": round(v["hits"] / max(1, v["hits"] + v["misses"]), 4)}
                       for e, v in sorted(self.epochs.items())],
            "hits": self.hits,
            "misses": self.misses,
            "wait_seconds": self.wait_seconds + waiting,
            "waiting": len(self._wanted_at),
            "notes_rejected": self.notes_rejected,
            "outside_waits": self.outside.total,
            "outside_refused": self.outside.refused,
        }


def _valid(uri: object) -> bool:
    """Whether a usage note names an object at all (cheap checks first, then the full parse)."""
    if not isinstance(uri, str) or len(uri) > MAX_URI_CHARS or not uri.startswith("s3://"):
        return False
    try:
        from_identity(uri)
    except S3CacheError:
        return False
    return True

