"""The rules of tests/model_machine.py that come from outside the daemon's traffic, as a mixin of its state
machine: operators (``s3cache pin``, ``verify --source``, SIGHUP's ``--max-size`` and ``--lease``, a
restart clean or a crash) and the host it runs on (the disk filling and space returning, time passing,
the wall clock stepping, housekeeping's turn). Readers, fetching, publishing and S3 stay in the machine.

Each rule acts through the daemon's real parts (as the machine's own rules do) and records what a later
check needs: ``superseded`` (files verify found changed in S3), ``ceiling`` (the bytes a smaller
``--max-size`` left above it), ``resolved``/``saved`` across a restart. A rule that sees a promise broken
at once calls ``_violate``; the machine's invariant (model_promises.py) fails the step.

Where the rules are defined does not change the sequences: hypothesis collects a machine's rules with
``inspect.getmembers``, in name order, whichever class holds them.

Uses the machine's attributes: ``h`` (the harness), ``clock``, ``known``, ``conns``, ``superseded``,
``ceiling``, ``resolved``, ``saved``, ``noted``, and its ``_read_messages``, ``_count``,
``_new_connection`` and ``_violate``."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import rule
from model_fakes import BUCKET
from model_promises import STATS

from s3cache.errors import PinQuotaExceeded
from s3cache.manifest.refs import parse_uri

KEYS = tuple(BUCKET + f"k{i}" for i in range(6))  # the bucket's objects (the machine's rules draw from them too)


def same_file(rec) -> tuple:
    """What tells one cached file from another of the same URI (a refetch renames over the same path,
    maybe within the same second): as ``Space.withdraw`` tells them."""
    return rec.path, rec.fetched_at, rec.crc32c


class OutsideRules:
    """Operators' and the host's rules (see the module docstring)."""

    # == operators ===================================================================================

    @rule(uri=st.sampled_from(KEYS), pin=st.booleans())
    def pin(self, uri, pin):
        d = self.h.d
        with d.cond:  # what Ops.pin does once the peer may pin
            try:
                d.space.pin([uri], pin)
            except PinQuotaExceeded:
                return
            if pin:
                d.schedule.fetch_soon(parse_uri(uri))
            d.schedule.work_changed()

    @rule(uri=st.sampled_from(KEYS))
    def verify_source(self, uri):
        d = self.h.d
        rec = d.space.ready.get(uri)
        report = d.maintenance.verify([uri], False, True)
        if rec is not None and report["changed"]:
            self.superseded[uri] = same_file(rec)

    @rule(max_size=st.sampled_from([900, 1500, 2000, 4000]), lease=st.sampled_from([5.0, 60.0, 600.0]))
    def sighup(self, max_size, lease):
        d = self.h.d
        # A lease that ended stays ended: a longer --lease stretches only the leases still in force (the
        # daemon may already have forgotten the others).
        for seen in self.resolved.values():
            for uri, (seq, when, size) in list(seen.items()):
                if self.clock.mono - when >= d.s.lease:
                    seen[uri] = (seq, float("-inf"), size)
        self.h.sighup(max_size=max_size, lease=lease)
        sp = d.space
        if sp.used + sp.reserved > max_size:
            # Only what eviction may not take stays above the new bound, and only goes down (_check_space)
            with d.cond:
                held = sp.leases.held(self.clock.mono)
                current = d.readers.tracker.current()
                left = [u for u in sp.ready if not (sp.is_pinned(u) or u in held
                                                    or sp.catalog.position(u) in current)]
            if left:
                self._violate(f"a smaller --max-size ({max_size}) left {sorted(left)} cached above it, "
                              f"neither pinned, leased nor being read")
            self.ceiling = max(self.ceiling, sp.used + sp.reserved)

    @rule(crash=st.booleans())
    def restart(self, crash):
        self._read_messages()
        before = dict(self.h.d.space.ready)
        self._count()
        self.h.restart(crash)
        STATS["crashes" if crash else "restarts"] += 1
        for reader in list(self.conns):  # their connections closed: each reader resolves again
            self._new_connection(reader)
        # Leases are kept across a restart as the last flush saved them (a clean stop flushes; a crash
        # loses what was granted since the last flush, at most a second's worth in the daemon).
        self.resolved = {r: dict(seen) for r, seen in self.saved.items()}
        self.noted = []
        if "restart_forgets_refetch" in self.known:
            self.superseded.clear()
        after, catalog = self.h.d.space.ready, self.h.catalog
        for uri, rec in before.items():
            if uri in after and (after[uri].path, after[uri].crc32c) == (rec.path, rec.crc32c):
                continue
            pos = catalog.position(uri)
            if pos is None or rec.stale_for(catalog.entry(pos)) is None:  # else: S3 changed it, listed anew
                self._violate(f"{'a crash' if crash else 'a restart'} lost the verified file of {uri}")

    # == the machine it runs on ======================================================================

    @rule()
    def disk_fills(self):
        self.h.fs.fill(leave=200)

    @rule()
    def space_returns(self):
        self.h.fs.other = 0

    @rule(seconds=st.sampled_from([1.0, 5.0, 30.0, 601.0, 3600.0]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @rule(step=st.sampled_from([-7200.0, 7200.0]))
    def wall_clock_steps(self, step):
        """An NTP step or an operator's ``date -s``: durations (leases, idle readers, backoffs) must not
        notice. The readers a reader's note made known within the idle time stay known."""
        d = self.h.d
        self.h.drain_notes()  # the use loop applies a note as it comes: the tracker knows what was noted
        tracker = d.readers.tracker
        recent = {r for r in tracker.ids() if self.clock.mono - self.active.get(r, -1e18) < tracker.idle}
        self.clock.wall += step
        with d.cond:
            tracker.future(len(d.schedule.catalog))  # what the next scan does first, on the tracker's clock
            lost = recent - set(tracker.ids())
        if lost:
            self._violate(f"a wall-clock step of {step:+.0f} s forgot readers active within the idle time: "
                          f"{sorted(lost)}")

    @rule()
    def housekeeping(self):
        self.h.housekeeping()
