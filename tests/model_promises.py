"""The promises tests/model_machine.py checks after every step, as a mixin of its state machine: each
``_check_*`` reads the parts under the state lock and records a violation naming what broke; ``check``
(the machine's invariant) fails the step if any was recorded.

Uses the machine's attributes: ``h`` (the harness), ``clock``, ``known`` (promises not checked),
``pending``, ``resolved``, ``superseded``, ``ceiling``, ``evictions_checked``,
``violations``, and its ``_read_messages``."""

from __future__ import annotations

from collections import Counter

from hypothesis.stateful import invariant
from model_fakes import PROCESS, content, gen_of

from s3cache.daemon.recovery import cached_files
from s3cache.policy.leases import LEASE_SHARE, LEASE_UID_SHARE
from s3cache.store.index import READY

# What the runs did, over every sequence, for the report of a long run (S3CACHE_MODEL_STATS=1 prints it).
STATS: Counter = Counter()


class Promises:
    """The invariant and its checks (see the module docstring)."""

    def _violate(self, what: str) -> None:
        self.violations.append(what)

    def _protected(self) -> set[str]:
        """Files readers' leases must hold now (docs/guarantees.md, "What a reader is promised"). A reader
        is a process; its lease holds the two files it resolved last, each for --lease seconds from
        resolving it. The processes of one uid (not root's, not the daemon's) hold at most about half the
        cache between them (``LEASE_UID_SHARE`` of the smaller of --max-size and the filesystem): the
        newest files first, each process's in turn, the file that crosses the cap still held, and two
        files always. Those turns go in an order the daemon keeps, so a file is required only if it is
        held in every order: when the files of the uid's other processes at its rank and the ranks before
        it (the worst case) leave it under the cap or among the first two. A process one of whose two
        newest files is out of its lease may hold an older file at that rank (a lower bound, never a false
        alarm). A file a reader stopped waiting on (it left) is not its: it is leased nothing for it."""
        d = self.h.d
        lease, now = d.s.lease, self.clock.mono
        cap = min(d.s.max_size, d.store.total_bytes()) // LEASE_UID_SHARE
        ready = d.space.ready
        by_uid: dict[int, list[tuple[list[tuple[str, int]], bool]]] = {}
        for reader, seen in self.resolved.items():
            mine = [(seq, uri, now - when < lease, size) for uri, (seq, when, size) in seen.items()]
            newest = sorted(mine, key=lambda t: t[0], reverse=True)[:2]
            # the bytes the lease counts: the file's size when resolved, or its size now if larger
            fresh = [(uri, max(size, ready[uri].size if uri in ready else 0))
                     for _, uri, live, size in newest if live]
            if fresh or newest:
                by_uid.setdefault(PROCESS[reader][0], []).append((fresh, len(fresh) < len(newest)))
        out = set()
        for lists in by_uid.values():
            for i, (mine, _) in enumerate(lists):
                for rank, (uri, _) in enumerate(mine):
                    if len(lists) == 1:  # the uid's only holder: its two newest are held whatever the cap
                        out.add(uri)
                        continue
                    before = list(mine[:rank])
                    known = True
                    for j, (other, unsure) in enumerate(lists):
                        if j != i:
                            known &= not unsure or len(other) > rank
                            before += other[:rank + 1]
                    if known and (len(before) < 2 or sum(n for _, n in before) < cap):
                        out.add(uri)
        return out

    @invariant()
    def check(self):
        STATS["steps"] += 1
        h = self.h
        d = h.d
        self._read_messages()
        # Against the leases in force when each eviction chose (a file evicted, fetched again and
        # resolved again within one step is leased now, not then).
        for victims, held, pinned, protected in h.evictions[self.evictions_checked:]:
            for v in victims:
                if v.uri in pinned:
                    self._violate(f"pinned {v.uri} evicted")
                if v.uri in held or v.uri in protected:
                    self._violate(f"{v.uri} evicted while a reader's lease holds it")
        self.evictions_checked = len(h.evictions)
        if h.errors:
            self._violate(f"a worker's outcome could not be routed: {h.errors}")
        with d.cond:
            self._check_space(d)
            self._check_disk(d)
            self._check_waits(d)
            self._check_status(d)
        assert not self.violations, "\n".join(self.violations)

    def _check_space(self, d) -> None:
        sp = d.space
        if sp.used != sum(r.size for r in sp.ready.values()):
            self._violate(f"ready bytes {sp.used} are not the sum of ready files")
        if sp.reserved != sum(sp.reservations.values()):
            self._violate(f"reserved bytes {sp.reserved} are not the sum of reservations")
        total = sp.used + sp.reserved
        if total > max(d.s.max_size, self.ceiling):
            self._violate(f"ready {sp.used} + reserved {sp.reserved} bytes exceed --max-size {d.s.max_size}"
                          + (f" and the {self.ceiling} bytes cached when it shrank" if self.ceiling else ""))
        self.ceiling = min(self.ceiling, total) if total > d.s.max_size else 0
        leak = set(sp.reservations) - set(d.schedule.fetching)
        if leak:
            self._violate(f"bytes reserved for downloads not in flight: {sorted(leak)}")

    def _check_disk(self, d) -> None:
        """The index, the files and the resident set agree; each file has its version's bytes."""
        rows = dict(d.index.items())
        ready = d.space.ready
        if set(rows) != set(ready):
            self._violate(f"index rows {sorted(rows)} are not the ready files {sorted(ready)}")
        paths = {r.path for r in ready.values()}
        orphans = set(cached_files(d.store)) - paths
        if orphans:
            self._violate(f"files on disk that no ready record names: {sorted(orphans)}")
        for uri, rec in ready.items():
            row = rows.get(uri)
            if row is not None and (row.state != READY or row.path != rec.path):
                self._violate(f"{uri}: index row {row} is not its ready record {rec}")
            path = d.store.layout.abspath(rec.path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                self._violate(f"{uri}: its ready file cannot be read: {e}")
                continue
            if data != content(uri, gen_of(rec.version), len(data)) or len(data) != rec.size:
                self._violate(f"{uri}: the file does not hold S3's bytes of {rec.version}")
            pos = d.schedule.position(uri)
            # A listed size is a hint: S3's size at the fetch wins (the object was rewritten since the
            # listing), as at publish; a stated size, a version or a checksum must match.
            if pos is not None and (why := rec.stale_for(d.schedule.catalog.entry(pos), hinted_size=False)):
                self._violate(f"{uri} is ready as current though the manifest says otherwise: {why}")

    def _check_waits(self, d) -> None:
        sched = d.schedule
        waited = {u for u, cs in d.readers.waiters.items() if cs}
        if waited != {u for _, u in self.pending}:
            self._violate(f"the daemon has readers waiting on {sorted(waited)}, the readers wait on "
                          f"{sorted({u for _, u in self.pending})}")
        for uri in waited:
            if d.space.is_ready(uri) and uri not in sched.replacing:
                self._violate(f"a reader still waits on {uri}, which is ready (a lost answer)")
            elif not (uri in sched.fetching or sched.demand.has(uri) or uri in sched.blocked):
                self._violate(f"a reader waits on {uri}, which is neither queued, in flight nor waiting "
                              f"for room (a lost wake-up)")
        for uri in self._stale():
            if uri not in sched.replacing:
                self._violate(f"{uri} changed in S3 (verify said so) and its refetch was dropped: the old "
                              f"bytes stay served as current")

    def _check_status(self, d) -> None:
        st_ = d.status()
        sp, sched = d.space, d.schedule
        in_flight = set(self.h.jobs) | set(self.h.queued)
        want = {
            # A copy verify found superseded holds its bytes but is never handed out: not a ready object.
            "objects.ready": sum(1 for r in sp.ready.values() if not r.superseded),
            "bytes.ready": sum(r.size for r in sp.ready.values()),
            "bytes.reserved": sum(sp.reservations.values()),
            "bytes.max": d.s.max_size,
            "objects.fetching": len(in_flight),
            "objects.failed": len(sched.failed),
            "failed_permanent": sum(1 for _, f in sched.failed.items() if f.permanent),
            "manifest_entries": len(self.h.catalog),
            "evicted": self.h.evicted_here,
            "waiting": len({u for _, u in self.pending}),
            "pinned.files": sum(1 for u in sp.ready if sp.is_pinned(u)),
        }
        if "sighup_leases" not in self.known:  # README: the lease budget is a 32nd of --max-size
            want["leases.budget"] = d.s.max_size // LEASE_SHARE
        got = {k: st_[k.split(".")[0]][k.split(".")[1]] if "." in k else st_[k] for k in want}
        if got != want:
            self._violate(f"status says {got}, the parts hold {want}")
        if st_["objects"]["queued"] < 0 or st_["loop_errors"]:
            self._violate(f"status: {st_['objects']}, loop errors {st_['loop_errors']}")

    def _stale(self) -> list[str]:
        """Objects verify found changed in S3 whose old file is still the ready one."""
        d = self.h.d
        ready = d.space.ready
        stale = [u for u, was in self.superseded.items()
                 if (r := ready.get(u)) is not None and (r.path, r.fetched_at, r.crc32c) == was]
        if "superseded_served" in self.known:  # its refetch failed for good or was dropped (item 8, known)
            sched = d.schedule
            # Blocked for room is the same known defect (item 8a: a refetch refused room is not tried
            # again; test_a_refetch_refused_room_once_is_not_dropped shows it).
            stale = [u for u in stale if not ((f := sched.failed.get(u)) and f.permanent)
                     and (u in sched.fetching or sched.demand.has(u))]
        return stale
