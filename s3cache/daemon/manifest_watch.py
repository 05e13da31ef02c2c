"""The manifest as the daemon sees it: read it whole (expanding ``prefix/`` lines by listing S3, keeping
this host's share), watch the file and every symlink on the way to it, and hand each new version to
``install``.

Owns the file's identity when last read, what the last read reported (listing failures, listed keys
skipped, the manifest's size across all shares), the demand for objects of other hosts' shares, the
watchdog observer with its watches, and the reload thread's wake-up event.

Invariants it keeps:

* an edit made after the daemon read the manifest is never missed: the watch starts before the daemon
  serves, and a change between the read and the watch (or between a read and re-planning the watch)
  triggers a reload;
* what is watched follows the path as it resolves now: the file, every symlink on the way and their
  directories (manifest_file.watch_plan), planned again after every read, so a Kubernetes ConfigMap's
  ``..data`` swap is seen and the next swap too;
* a burst of file events (write, close, rename) becomes one reload;
* a manifest is installed only whole: one that fails to parse is not installed (the previous one stays,
  and the refusal is in ``errors`` until a version installs), and one being written (modified within
  ``settle`` seconds, or changed while it was read) is read again once it has held still
  (manifest_file.load); under a manifest directory the unit is each job's file: a bad one keeps that
  job's text in force (``_kept``) while the other jobs' edits install;
* a version that arrived only by renames (the file, or a job's file, or a link on the way, renamed into
  place: no write, create or close event on what is read since the last read) is whole when it lands,
  so it is read at once, without waiting ``settle`` for it to hold still: a job that renames its
  manifest into place gets its files a quarter second sooner (``_written``);
* a prefix line that could not be listed is listed again (the manifest read again) with backoff,
  ``RELIST_FIRST`` doubling to ``RELIST_MAX`` seconds, until every line lists;
* the reload thread survives any exception of one attempt: logged once, counted in ``status``.

Threads: ``read`` runs on one thread at a time (start-up, then the reload thread only), as do the watch
re-planning and ``install`` (a callable handed at construction that takes the daemon's state lock
itself). ``demanded`` and ``status`` run on the control server's threads: the counters they share are
under ``_lock``, a leaf lock held for a few lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from s3cache.errors import FetchFailed, ManifestError, ManifestUnstable, S3CacheError
from s3cache.fetch.fetcher import Cancelled
from s3cache.manifest import file as manifest_file
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.jobs import job_name
from s3cache.manifest.parse import Listed, SkipLog
from s3cache.manifest.shard import WHOLE, Shard

log = logging.getLogger("s3cache.daemon")

SETTLE = 0.05  # seconds: events of one save come within a millisecond or two
START_WAIT = 30.0  # seconds start-up waits for a manifest being written to hold still
# Events that may change what the manifest path leads to. Not "opened"/"closed_no_write": reading the
# manifest ourselves makes those, and reloading on them would loop.
_EVENTS = frozenset({"created", "modified", "moved", "closed", "deleted"})
RECENT = 20  # off-share objects remembered for status
RELIST_FIRST, RELIST_MAX = 1.0, 60.0  # seconds before listing a failed prefix line again: doubling, capped


class ManifestWatch:
    def __init__(self, path: str, *, lister: Callable[[str, str], list[Listed]],
                 install: Callable[[Catalog], None], stopping: threading.Event, shard: Shard = WHOLE,
                 settle: float = manifest_file.SETTLE, start_wait: float = START_WAIT,
                 directory: bool = False) -> None:
        self.path = path
        self.directory = directory  # a manifest directory (--manifest-dir): each NAME.txt a job (jobs.py)
        self.shard = shard
        self.settle = settle
        self._start_wait = start_wait
        self._lister = lister  # Fetcher.list
        self._install = install
        self._stopping = stopping
        self._reload = threading.Event()
        self._seen: object = None  # the file (Identity) or directory (DirIdentity) as last installed
        self._looked: object = None  # ... as last read, whole or not (bad ones too)
        self._rejected: object = None  # ... as last read and refused (a bad line): no edit on its way
        self._observer = None
        self._handler = None
        self._plan: manifest_file.WatchPlan | None = None
        self._watches: dict[str, object] = {}  # directory -> watchdog's ObservedWatch
        self._lock = threading.Lock()
        self._catalog = Catalog()  # the last one read whole (handed to install, or about to be)
        self._listing_errors: list[str] = []  # prefixes the last read whole could not list
        self._refusal: str | None = None  # why the last edit was refused (None once one installs)
        self._refused_jobs: dict[str, str] = {}  # a directory's jobs refused in the version in force
        self._kept: dict[str, bytes] | None = {} if directory else None  # each job's text in force
        self._read_texts: dict[str, bytes] = {}  # ... in the version last read whole
        # Prefix lines that failed to list are listed again (the whole manifest read again) at
        # _relist_at (monotonic; None: nothing failed), after _relist_attempts reads that failed to.
        self._relist_at: float | None = None
        self._relist_attempts = 0
        self.skipped = SkipLog()
        self.reload_failures = 0  # reload attempts ended by an unexpected exception
        self._off_share = 0
        self._off_recent: deque[str] = deque(maxlen=RECENT)
        # Whether a relevant event since the last read wrote what is read (not only renamed it into
        # place). Set by the observer's thread, taken by the reload thread, under _lock.
        self._written = False

    # == reading ======================================================================================

    def read(self) -> Catalog:
        """Start-up's read: wait (up to ``start_wait`` seconds) for a manifest being written to hold
        still, then parse it and list its prefixes. Raises ManifestError (S3CacheError)."""
        deadline = time.monotonic() + self._start_wait
        seen = None
        while True:
            try:
                catalog = self._load(seen)
                self._installed()  # start-up and SIGHUP install it before anyone can ask
                return catalog
            except ManifestUnstable as e:
                if time.monotonic() + e.retry_after > deadline:
                    raise ManifestError(self.path, None, f"still being written after {self._start_wait:.0f}s "
                                        f"({e}); write it elsewhere and rename it into place") from None
                log.info("%s", e)
                seen = e.identity
                if self._stopping.wait(e.retry_after):
                    raise

    def _load(self, seen, settle: float | None = None) -> Catalog:
        """Read the manifest whole (``settle``: instead of ``self.settle``; 0 for one renamed into place)."""
        path = self.path
        settle = self.settle if settle is None else settle
        errors: list[str] = []

        def lister(bucket: str, prefix: str):
            try:
                return self._lister(bucket, prefix)
            except (FetchFailed, Cancelled) as e:
                why = f"{e.code}: {e.reason}" if isinstance(e, FetchFailed) else str(e)  # e names the prefix too
                errors.append(f"{path}: cannot list s3://{bucket}/{prefix}: {why}")
                log.error("%s", errors[-1])
                return []

        self._looked = self._identity()
        if self.directory:
            loaded = manifest_file.load_dir(path, lister, self.shard, settle=settle, seen=seen, kept=self._kept)
        else:
            loaded = manifest_file.load(path, lister, self.shard, settle=settle, seen=seen)
        self._looked = loaded.identity  # becomes _seen once installed (read() is installed by its caller)
        self._read_texts = dict(loaded.texts)
        self._plan_relist(len(errors))
        for why in loaded.refused.values():
            log.error("manifest job not reloaded, keeping its previous version (if any): %s", why)
        with self._lock:
            self._listing_errors = errors
            self._refused_jobs = dict(loaded.refused)
            self.skipped = loaded.skipped
            self._catalog = loaded.catalog
        if not self.shard.whole:
            log.info("manifest %s: share %s holds %d of %d entries", path, self.shard, len(loaded.catalog),
                     loaded.catalog.total)
        return loaded.catalog

    def carry_over(self, old: ManifestWatch) -> None:
        """SIGHUP replaces ``old`` with this watch of the same directory: each job's text in force
        stays what a refused job falls back to (else a bad job file would retire the job)."""
        if self.directory and old.directory and old.path == self.path and old._kept is not None:
            self._kept = dict(old._kept)

    def _plan_relist(self, failed: int) -> None:
        """After a read whole: when to list again the prefix lines it could not list (with backoff), or
        that every one was listed, after failing before."""
        if failed:
            self._relist_attempts += 1
            delay = min(RELIST_MAX, RELIST_FIRST * 2 ** (self._relist_attempts - 1))
            self._relist_at = time.monotonic() + delay
            log.warning("%s: %d prefix line(s) could not be listed; listing again in %.0fs (attempt %d)",
                        self.path, failed, delay, self._relist_attempts)
        elif self._relist_at is not None:
            log.info("%s: every prefix line listed, after %d failed attempt(s)", self.path, self._relist_attempts)
            self._relist_at, self._relist_attempts = None, 0

    def _relist_in(self) -> float | None:
        """Seconds until failed prefix lines are due to be listed again (None: none failed)."""
        at = self._relist_at
        return None if at is None else max(0.0, at - time.monotonic())

    # == watching =====================================================================================

    def watch(self) -> None:
        """Start watching the manifest's path; run ``reload_loop`` on a thread of the caller's."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        me = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                plan = me._plan
                if event.event_type in _EVENTS and plan is not None and \
                        plan.relevant(event.src_path, getattr(event, "dest_path", None)):
                    if me._writes(event, plan):
                        with me._lock:
                            me._written = True
                    me._reload.set()

        obs = Observer()
        obs.daemon = True
        obs.start()
        self._observer, self._handler = obs, Handler()
        self._replan()

    def _writes(self, event, plan: manifest_file.WatchPlan) -> bool:
        """Whether ``event`` (relevant) may leave what is read half-written: anything but a rename. A
        rename changes what a name leads to in one step, so the version it puts in place is whole (a
        ConfigMap's ``..data`` swap, a job's ``os.replace``); a write, create or close on a temporary
        beside it is not read (a manifest directory reads only job files: ``job_name``)."""
        if event.event_type == "moved" or (event.is_directory and event.event_type == "modified"):
            return False  # a directory's "modified" says its entries changed: their own events say how
        if not self.directory:
            return True
        name = os.path.basename(os.fsdecode(event.src_path))
        return job_name(name) is not None or os.path.normpath(os.fsdecode(event.src_path)) in plan.paths

    def _replan(self) -> None:
        """Watch what the path leads through now, and reload if it changed since it was last read."""
        if self._observer is None:
            return
        plan = manifest_file.watch_plan(self.path, self.directory)
        self._plan = plan
        for d in set(self._watches) - plan.dirs:
            try:
                self._observer.unschedule(self._watches.pop(d))
            except Exception:  # its directory is gone (an old ConfigMap generation): nothing to stop
                pass
        for d in sorted(plan.dirs - set(self._watches)):
            try:
                self._watches[d] = self._observer.schedule(self._handler, d, recursive=False)
            except OSError as e:  # removed since the plan: the next event or read plans again
                log.warning("cannot watch %s for manifest changes: %s", d, e.strerror or e)
        if self._identity() != self._looked:
            with self._lock:
                self._written = True  # how it changed is unknown: read it once it has held still
            self._reload.set()  # it changed between our reading it and the watch covering it

    def _identity(self) -> object:
        """What the manifest (file or directory) looks like now; compared with what was last read."""
        return manifest_file.dir_identity(self.path) if self.directory else manifest_file.identity(self.path)

    def reload_loop(self) -> None:
        """The reload thread: read and install the manifest after each change, until stopping."""
        seen = None  # the manifest as the last ManifestUnstable saw it
        failed_before: set[str] = set()
        while True:
            relist = not self._reload.wait(self._relist_in())  # timed out: failed listings are due
            if self._stopping.is_set():
                return
            if relist:  # not again before the next backoff, whatever this attempt ends in
                self._relist_at = time.monotonic() + min(RELIST_MAX, RELIST_FIRST * 2 ** self._relist_attempts)
            # Let a burst of events (write, close, rename) settle into one reload. They come within
            # a millisecond or two; a longer settle only delays a job that just wrote its manifest.
            while self._reload.is_set():
                self._reload.clear()
                if self._stopping.wait(SETTLE):
                    return
            # Only renames since the last read: the version in place is whole, read it now. Taken after
            # the burst settled; an event after this sets _reload, and that version is read again.
            with self._lock:
                renamed, self._written = not self._written and not relist and seen is None, False
            try:
                now = self._identity()
                if not relist and seen is None and now is not None and now in (self._seen, self._rejected):
                    # an event that changed nothing read (a swap file beside a directory's jobs, a
                    # touch of a rejected file): a reload would only forget where every reader is
                    log.debug("%s: no change to what was read; not reloaded", self.path)
                    continue
                try:
                    catalog = self._load(seen, 0.0 if renamed else None)
                except ManifestUnstable as e:
                    with self._lock:
                        self._written = True  # read again after settle, as any version being written
                    (log.info if seen is None else log.debug)("%s", e)
                    seen = e.identity
                    if self._stopping.wait(e.retry_after):
                        return
                    self._reload.set()
                    continue
                except S3CacheError as e:
                    seen = None
                    if isinstance(e, ManifestError) and e.line is not None:  # a bad line: this version
                        self._rejected = self._looked  # will never install (an unreadable file may, later)
                    log.error("manifest not reloaded, keeping the previous one: %s", e)
                    self.refused(str(e))
                    continue
                seen = None
                self._install(catalog)
                self._installed()  # only now: until it is in force, an edit is still on its way
            except Exception as e:
                with self._lock:
                    self.reload_failures += 1
                kind = type(e).__name__
                if kind not in failed_before:  # logged once per kind: a loop must not flood the log
                    failed_before.add(kind)
                    log.exception("manifest reload failed; keeping the previous manifest")
                else:
                    log.error("manifest reload failed again: %s: %s", kind, e)
            finally:
                try:
                    self._replan()
                except Exception:
                    log.exception("re-planning the manifest watch failed")

    def _installed(self) -> None:
        """The version last read whole is in force: what is compared with the disk from now on, the job
        texts a refused job falls back to, and no refusal left to report."""
        self._seen = self._looked
        if self._kept is not None:
            self._kept = self._read_texts
        with self._lock:
            self._refusal = None

    def refused(self, why: str) -> None:
        """An edit was refused (a bad line; SIGHUP's read of it): reported until a version installs."""
        with self._lock:
            self._refusal = why

    @property
    def errors(self) -> list[str]:
        """What ``status`` reports as ``manifest_errors``: prefixes the version in force could not list
        (with when they are listed again), jobs of it refused, and the last edit refused since a version
        was installed."""
        again = self._relist_in()
        retry = "" if again is None else f" (listing again in {again:.0f}s, attempt {self._relist_attempts + 1})"
        with self._lock:
            return [e + retry for e in self._listing_errors] + list(self._refused_jobs.values()) + \
                ([self._refusal] if self._refusal else [])

    def edited(self) -> bool:
        """Whether the manifest on disk differs from the version last read whole (an edit not yet
        installed; not one that was read and refused: it does not parse). One stat (a listing for a
        directory): for rare questions, such as a want outside the demand scope."""
        now = self._identity()
        return now != self._seen and now != self._rejected

    def wake(self) -> None:
        """Let the reload thread see that the daemon stops."""
        self._reload.set()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    # == reporting ====================================================================================

    def demanded(self, uris: Iterable[str]) -> None:
        """Readers asked for these objects (not cached: fetched on demand). Count those that belong to
        another host's share: they are served, but each is a sign the hosts' shares and the readers'
        disagree (a different file list or order, or a different shard)."""
        if self.shard.whole:
            return
        catalog = self._catalog
        off = [u for u in uris if catalog.off_share(u)]
        if off:
            with self._lock:
                self._off_share += len(off)
                self._off_recent.extend(off)
            log.debug("demand for %d object(s) of other hosts' shares, e.g. %s", len(off), off[0])

    def status(self) -> dict:
        """This part's piece of ``status``."""
        with self._lock:
            catalog, skipped = self._catalog, self.skipped
            return {
                "shard": str(self.shard),
                "manifest_total": catalog.total,
                "manifest_skipped": {"count": skipped.count, "items": [s._asdict() for s in skipped.items]},
                "off_share": {"count": self._off_share, "recent": list(dict.fromkeys(self._off_recent))},
                "manifest_reload_failures": self.reload_failures,
            }
