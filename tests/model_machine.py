"""A model of the daemon: random sequences of what happens to it, its promises checked after every step.

A hypothesis ``RuleBasedStateMachine`` drives the daemon's real parts (space, schedule, readers,
publisher, workers, pins, failures, leases, eviction, the index and the files on a real cache dir),
wired by the daemon's own composition root, with S3, the clock, the filesystem's free space and the
sockets replaced at their boundaries (tests/model_harness.py says how). Rules: readers' wants, usage
notes and closed connections; fetches handed out, finishing, failing (transient, permanent), finding
the object changed, filling the disk; publishes; manifest installs that add, drop or change entries
(size, checksum, version, pin); objects changing in S3 and ``verify --source`` noticing; pins; SIGHUP
settings (``max_size``, ``lease``); restarts, clean or a crash, rebuilt from the index on disk; the disk
filling and space returning; time passing and the wall clock stepping; housekeeping's turn.
The operators' and the host's rules (pins, verify, SIGHUP, restarts, the disk, the clocks,
housekeeping) are a mixin, tests/model_rules_outside.py; the promises, tests/model_promises.py.

After every step (``check``): no leased or pinned file evicted; ready + reserved bytes within
``--max-size``; the index, the files on disk and the resident set agree (no orphan, no missing file);
no superseded file is ready as current, and every file served has the bytes S3 had for its version; a
refetch the daemon knows it needs is not dropped; every reader waiting on an object is either served
or its object is queued, in flight or waiting for room (no lost wake-up); every want gets one answer;
a permanent failure is charged only to the manifest entry its fetch used; nothing verified is
downloaded twice, and a restart keeps every verified file; ``status`` says what the parts hold.
``settle`` then runs the daemon to quiescence (successful fetches, time passing, space returning) and
checks that every want was answered.

Known defects that other changes fix are named in ``KNOWN``: the machine does not check those
promises, and each has an example test in tests/test_model.py, marked xfail(strict=True), that replays
the minimal sequence and fails until the fix lands (then the strict xfail fails: drop the name from
``KNOWN``). tests/test_model.py runs the machine and says how to scale it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
)
from model_fakes import BUCKET, PROCESS, Conn, FakeClock, clocked, version_of
from model_harness import Harness
from model_promises import STATS, Promises
from model_rules_outside import KEYS, OutsideRules, same_file

from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import parse_uri
from s3cache.service.config import Settings
from s3cache.sockets.usage_socket import holder_of, lease_name
from s3cache.store.layout import SUPERSEDED_BIT

READERS = tuple(PROCESS)
MISSING = BUCKET + "never-uploaded"
OUTCOMES = ("ok", "ok", "ok", "transient", "changed", "changed_for_good", "disk_full")
WORKERS = 3  # --workers: prefetch's connections
MAX_IN_FLIGHT = 2 * WORKERS  # worker threads (Workers.threads): as many again kept for readers' objects

# Promises known broken, each fixed by another change now; the machine leaves them unchecked and an
# xfail(strict) example below shows each one.
KNOWN = frozenset({
})


if os.environ.get("S3CACHE_MODEL_STATS"):
    atexit.register(lambda: print("\nmodel stats:", dict(sorted(STATS.items())), file=sys.stderr))


def _named(reader: str) -> str:
    """What the daemon's sockets hand the readers part for ``reader``: its claimed id and the holder the
    kernel names (``Ops`` and the usage socket build it so)."""
    uid, pid = PROCESS[reader]
    return lease_name(reader, holder_of(pid, uid))


def entry_spec():
    """How an install describes one object: (size, checksum, version, pin)."""
    return st.tuples(st.sampled_from(["none", "right", "right", "wrong", "hint", "hint_wrong"]),
                     st.sampled_from(["none", "none", "right", "wrong"]),
                     st.sampled_from(["latest", "latest", "current", "first"]),
                     st.sampled_from([False, False, False, True]))


class DaemonModel(Promises, OutsideRules, RuleBasedStateMachine):
    def __init__(self, known: frozenset[str] = KNOWN) -> None:
        super().__init__()
        self.known = known  # promises not checked (see KNOWN)
        self.active: dict[str, float] = {}  # reader -> when (monotonic) it last told the daemon anything
        # The bytes a smaller --max-size left above it (leased, pinned, being read, in flight), which may
        # only go down (admission evicts down to the new size), 0 once within it.
        self.ceiling = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="s3cache-model-"))
        self.clock = FakeClock()
        self._clocked = clocked(self.clock)
        self._clocked.__enter__()
        self.h = Harness(self.tmp / "cache", Settings(cache_dir=self.tmp / "cache", max_size=2000, lease=600.0,
                                                      min_free=0.0, workers=WORKERS,
                                                      allow=("s3://",)), self.clock)
        self.conns = {r: Conn(r, *PROCESS[r]) for r in READERS}
        self.read = {r: 0 for r in READERS}  # messages of each connection already looked at
        self.pending: dict[tuple[str, str], int] = {}  # (reader, uri) -> the want's place in order
        # What each reader resolved: uri -> (its place in the reader's order, when, the file's size);
        # a reader's lease holds the two files it resolved last for --lease seconds (_protected).
        self.resolved: dict[str, dict[str, tuple[int, float, int]]] = {r: {} for r in READERS}
        self.seq = 0
        self.noted: list[tuple[str, str, int]] = []  # (reader, uri, seq) of each note, the last ones not drained
        # What the leases saved at the last flush hold (``resolved`` then, less notes not yet drained):
        # what a restart keeps (kept_leases.py).
        self.saved: dict[str, dict[str, tuple[int, float, int]]] = {r: {} for r in READERS}
        self.h.on_flush = self._flushed
        self.h.protected = self._protected
        self.superseded: dict[str, tuple] = {}  # uri -> the file (``same_file``) verify found changed in S3
        self.evictions_checked = 0
        self.violations: list[str] = []
        STATS["sequences"] += 1

    def _count(self) -> None:
        """Add what this daemon did to STATS (before it is replaced or closed)."""
        d = self.h.d
        STATS["published"] += d.publisher.fetched
        STATS["superseded at publish"] += d.publisher.superseded
        STATS["evicted"] += d.space.evicted
        STATS["failures"] += d.schedule.failures

    def teardown(self) -> None:
        try:
            if self.h.d is not None and not self.violations:
                self.settle()
                self._count()
        finally:
            try:
                self.h.close()
            finally:
                self._clocked.__exit__(None, None, None)
                shutil.rmtree(self.tmp, ignore_errors=True)

    # == the world ===================================================================================

    # Sizes that fill the 2000-byte cache after a few files (hypothesis leans to the smallest values).
    @initialize(sizes=st.lists(st.sampled_from([700, 300, 500, 900, 60]), min_size=len(KEYS), max_size=len(KEYS)),
                listed=st.booleans())
    def objects(self, sizes, listed):
        """The bucket, and a manifest of it all (sizes stated) or none yet."""
        for uri, n in zip(KEYS, sizes):
            self.h.s3.put(uri, n)
        if listed:
            self.h.install([Entry(parse_uri(u), n) for u, n in zip(KEYS, sizes)])

    @rule(uri=st.sampled_from(KEYS), size=st.sampled_from([600, 200, 950]))
    def s3_overwrite(self, uri, size):
        self.h.s3.put(uri, size)

    @rule(uri=st.sampled_from(KEYS))
    def s3_delete(self, uri):
        self.h.s3.delete(uri)

    @rule(keys=st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)),
          specs=st.lists(entry_spec(), min_size=len(KEYS), max_size=len(KEYS)))
    def install_manifest(self, keys, specs):
        entries = []
        s3 = self.h.s3
        for uri, (size, sha, ver, pin) in zip(keys, specs):
            last = len(s3.gens[uri]) - 1
            gen = 0 if ver == "first" else last
            real = s3.gens[uri][gen]
            kw = {"pin": pin}
            if ver != "latest":
                kw["version"] = version_of(gen)
            if size == "right":
                kw["size"] = real
            elif size == "wrong":
                kw["size"] = real + 1
            elif size in ("hint", "hint_wrong"):
                kw["size"], kw["size_is_hint"] = real + (3 if size == "hint_wrong" else 0), True
            if sha == "right":
                kw["sha256"] = s3.sha256(uri, gen)
            elif sha == "wrong":
                kw["sha256"] = "0" * 64
            entries.append(Entry(parse_uri(uri), **kw))
        self.h.install(entries)

    # == readers =====================================================================================

    @rule(reader=st.sampled_from(READERS), uri=st.sampled_from(KEYS + (MISSING,)))
    def want(self, reader, uri):
        if (reader, uri) in self.pending:
            return  # one resolve of an object at a time per reader
        [res] = self.h.d.readers.want(self.conns[reader], _named(reader), [uri])
        self._active(reader, uri)
        self.seq += 1
        STATS[f"want {res['state']}"] += 1
        if res["state"] == "ready":
            self._served(reader, uri, res["path"], self.seq)
        elif res["state"] == "pending":
            self.pending[(reader, uri)] = self.seq
        else:
            assert res["state"] == "failed", res

    @rule(reader=st.sampled_from(READERS), uri=st.sampled_from(KEYS))
    def note(self, reader, uri):
        """The reader's fast path: the file is on disk, it takes it and sends a usage note."""
        rec = self.h.d.space.ready.get(uri)
        if rec is None or not os.path.exists(self.h.d.store.layout.abspath(rec.path)):
            return
        if os.lstat(self.h.d.store.layout.abspath(rec.path)).st_mode & SUPERSEDED_BIT:
            return  # resolve's fast path passes a file marked superseded by (it asks the daemon)
        self.h.server.use.notes.append((_named(reader), "h", uri))
        self._active(reader, uri)
        self.seq += 1
        self.resolved[reader][uri] = (self.seq, self.clock.mono, rec.size)
        self.noted.append((reader, uri, self.seq))

    # The common steps come more often than the rare ones (hypothesis picks rules uniformly).
    @rule(reader=st.sampled_from(READERS), uri=st.sampled_from(KEYS))
    def want_listed(self, reader, uri):
        self.want(reader, uri)

    @precondition(lambda self: len(self.h.jobs) < MAX_IN_FLIGHT)
    @rule()
    def start_another_fetch(self):
        self.start_fetch()

    @precondition(lambda self: self.h.jobs)
    @rule(i=st.integers(0, MAX_IN_FLIGHT - 1))
    def fetch_succeeds(self, i):
        self.finish_fetch(i, "ok")

    @rule(n=st.integers(1, 4))
    def workers_run(self, n):
        """Workers take up to ``n`` jobs, S3 answers each at once, the publisher publishes them."""
        for _ in range(n):
            if len(self.h.jobs) >= MAX_IN_FLIGHT or (job := self.h.take()) is None:
                break
            self._start(job)
            if job[0].uri in self.h.jobs:
                self.finish_fetch(sorted(self.h.jobs).index(job[0].uri), "ok")
        self.h.publish()

    @rule()
    def drain_notes(self):
        self.h.drain_notes()

    @rule(reader=st.sampled_from(READERS))
    def reader_leaves(self, reader):
        self._read_messages()
        self.h.d.readers.closed(self.conns[reader])
        self._new_connection(reader)

    def _new_connection(self, reader):
        self.conns[reader] = Conn(reader, *PROCESS[reader])
        self.read[reader] = 0
        for key in [k for k in self.pending if k[0] == reader]:
            del self.pending[key]  # it stopped waiting: the file is not leased to it when it lands

    def _flushed(self) -> None:
        """The daemon wrote its leases to the index: those of every resolve it has heard of, which is
        every one but the usage notes still unread on its socket."""
        unread = len(self.h.server.use.notes)
        self.noted = self.noted[len(self.noted) - unread:] if unread else []
        lost = {(r, u, seq) for r, u, seq in self.noted}
        self.saved = {r: {u: v for u, v in seen.items() if (r, u, v[0]) not in lost}
                      for r, seen in self.resolved.items()}

    def _active(self, reader: str, uri: str) -> None:
        """A reader told the daemon it resolved ``uri``: the tracker learns where it is only from a
        position in the manifest (an object outside it moves no reader)."""
        if self.h.d.schedule.position(uri) is not None:
            self.active[reader] = self.clock.mono

    def _served(self, reader: str, uri: str, path: str, seq: int) -> None:
        """A reader was given ``path`` for ``uri``: it is the current, verified file."""
        d = self.h.d
        rec = d.space.ready.get(uri)
        if rec is None or rec.path != path:
            self._violate(f"{reader} was given {path} for {uri}, which is not its ready file")
            return
        if uri in self.superseded and self.superseded[uri] == same_file(rec) \
                and "superseded_served" not in self.known:
            self._violate(f"{reader} was given {uri}'s file that verify found superseded in S3")
        self.resolved[reader][uri] = (seq, self.clock.mono, rec.size)

    def _read_messages(self) -> None:
        for reader, conn in self.conns.items():
            for msg in conn.sent[self.read[reader]:]:
                key = (reader, msg["uri"])
                if key not in self.pending:
                    self._violate(f"{reader} got an answer it did not wait for, or a second one: {msg}")
                    continue
                seq = self.pending.pop(key)
                STATS[f"answer {msg['event']}"] += 1
                if msg["event"] == "ready":
                    self._served(reader, msg["uri"], msg["path"], seq)
            self.read[reader] = len(conn.sent)

    # == fetching ====================================================================================

    @precondition(lambda self: len(self.h.jobs) < MAX_IN_FLIGHT)
    @rule()
    def start_fetch(self):
        job = self.h.take()
        if job is not None:
            self._start(job)

    def _start(self, job) -> None:
        """A worker takes ``job``: nothing verified is downloaded again, nothing twice at once."""
        entry, demand = job
        d, uri = self.h.d, entry.uri
        if uri in self.h.jobs or uri in self.h.queued:
            self._violate(f"{uri} handed out while its fetch is still in flight")
        rec = d.space.ready.get(uri)
        current = d.schedule.entry_for(uri)
        if rec is not None and uri not in d.schedule.replacing and current is not None \
                and (d.schedule.position(uri) is None or rec.stale_for(current, hinted_size=False) is None):
            self._violate(f"{uri} is downloaded again though its verified file is ready")
        self.h.start(entry, demand)

    @precondition(lambda self: self.h.jobs)
    @rule(i=st.integers(0, MAX_IN_FLIGHT - 1), outcome=st.sampled_from(OUTCOMES))
    def finish_fetch(self, i, outcome):
        uris = sorted(self.h.jobs)
        job = self.h.jobs[uris[i % len(uris)]]
        self.h.finish(job, outcome)
        STATS[f"fetch {outcome}"] += 1
        d, uri = self.h.d, job.entry.uri
        f = d.schedule.failed.get(uri)
        if "wrong_entry" not in self.known and f is not None and f.permanent and d.schedule.position(uri) is not None \
                and d.schedule.entry_for(uri) != job.entry:
            self._violate(f"{uri}: the permanent failure ({f.code}) of a fetch for an older manifest entry "
                          f"is charged to the entry in force")

    @rule()
    def publish(self):
        self.h.publish()

    # == quiescence ==================================================================================

    @rule()
    def settle(self):
        """Run the daemon until nothing is left to do: every fetch succeeds, space returns, time passes
        beyond every lease and backoff. Then every want has been answered."""
        h = self.h
        h.fs.other = 0
        for turn in range(300):
            h.drain_notes()
            h.housekeeping()
            self._read_messages()
            if not (self.pending or self._stale() or h.jobs or h.queued):
                break
            if turn % 10 == 9:  # leases, idle readers and backoffs end; a blocked prefetch may cycle meanwhile
                self.clock.advance(h.d.s.lease + 601.0)
            if h.jobs:
                h.finish(h.jobs[min(h.jobs)], "ok")
            elif h.queued:
                h.publish()
            elif (job := h.take()) is not None:
                self._start(job)
            else:
                self.clock.advance(1.0)
        else:
            self._violate("the daemon did not settle in 300 turns")
        self._read_messages()
        if self.pending:
            self._violate(f"wants never answered with every fetch succeeding and room to spare: "
                          f"{sorted(self.pending)}")
        for uri in self._stale():
            self._violate(f"{uri}: verify found it changed in S3, and its old bytes are still served")
        self.superseded.clear()
