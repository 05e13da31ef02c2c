"""The manifest in force, and SIGHUP: configuration and manifest again, keeping the cache and readers.

* ``Manifests`` holds the current manifest watch and installs each version it reads into the parts
  (the space drops stale files, readers and the schedule start over on the new catalog).
* ``Reload`` runs on its own thread: on SIGHUP it re-reads the configuration as ``serve`` read it
  (flags still win over the file and the environment), applies the settings that can change live
  (``LIVE_SETTINGS``), logs those that wait for a restart, and replaces the manifest watch.

Invariants: a version is installed in one hold of the lease lock and the state lock (``Space.exclusive``),
so no reader is between its stat and its usage note while stale files leave; only the current watch
installs: each watch carries the generation it was made in, ``replace`` reads the new manifest first
(a bad one leaves the old watch in force, still watching), then bumps the generation (under the state
lock) before it stops the old watch, and ``install`` drops a version from an older generation, so an old
watch's last read never lands after the new manifest. A version equal to the one in force
(``Catalog.same``: a ConfigMap resync, a touch) installs nothing, so readers keep their places. A configuration or manifest that does not
load keeps the running one, says why in the log and to systemd (READY=1 with the reason), and changes
nothing. Log lines keep the daemon's logger name (``s3cache.daemon``), as before this was split out.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from s3cache.errors import S3CacheError
from s3cache.manifest.catalog import Catalog
from s3cache.service import notify
from s3cache.service.config import Settings

from .manifest_watch import ManifestWatch

log = logging.getLogger("s3cache.daemon")

# Settings a SIGHUP applies to the running daemon; any other that changed waits for a restart.
LIVE_SETTINGS = ("manifest", "manifest_dir", "max_size", "lease", "readahead", "min_free", "low_watermark",
                 "revalidate", "log_level")


def merge_settings(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``old`` with ``new``'s live settings, and the names of the other settings that changed (they take
    effect only after a restart)."""
    later = [o.name for o in dataclasses.fields(Settings)
             if o.name not in LIVE_SETTINGS and getattr(new, o.name) != getattr(old, o.name)]
    return dataclasses.replace(old, **{k: getattr(new, k) for k in LIVE_SETTINGS}), later


class Manifests:
    """The current manifest watch (``watch``, None without a manifest) and its generation (see the module
    docstring). ``install_parts(catalog)`` installs a version into the parts and returns the stale URIs;
    it is called with ``exclusive()`` held."""

    def __init__(self, settings: Callable[[], Settings], cond: threading.Condition, *, lister: Callable,
                 spawn: Callable[..., None], exclusive: Callable[[], AbstractContextManager],
                 install_parts: Callable[[Catalog], Collection[str]]) -> None:
        self._settings = settings
        self._cond = cond
        self._lister = lister
        self._spawn = spawn
        self._exclusive = exclusive
        self._install_parts = install_parts
        self.watch: ManifestWatch | None = None
        self.gen = 0  # bumped when SIGHUP replaces the watch: an older watch may not install
        self._stop: threading.Event | None = None  # the current watch's own stop
        # ``stop`` may run (the signals thread) while ``replace`` (the reload thread) reads a new watch's
        # manifest: the swap and the stop take this lock, so a watch swapped in after the stop is
        # stopped too and its thread never started (teardown would wait for it for ever).
        self._swap = threading.Lock()
        self._stopped = False
        self._installed: Catalog | None = None  # the version in force (None before the first install)

    def new_watch(self, path: str, directory: bool = False) -> ManifestWatch:
        """Start-up's watch of ``path`` (a manifest directory if ``directory``), made current."""
        self.watch, self._stop = self._make_watch(path, directory, self.gen)
        return self.watch

    def _make_watch(self, path: str, directory: bool, gen: int) -> tuple[ManifestWatch, threading.Event]:
        """A watch of ``path`` with its own stop event, installing as generation ``gen``."""
        stop = threading.Event()
        s = self._settings()
        watch = ManifestWatch(path, lister=self._lister, stopping=stop,
                              install=lambda catalog: self.install(catalog, gen, path),
                              shard=s.shard, settle=s.manifest_settle, directory=directory)
        return watch, stop

    def start_watch(self, watch: ManifestWatch) -> None:
        watch.watch()
        self._spawn(watch.reload_loop, "s3cache-manifest", loop="manifest", stopping=self._stop)

    def install(self, catalog: Catalog, gen: int | None = None, path: str | None = None) -> None:
        """Switch to a new manifest. Work is proportional to what is cached, not to the manifest.
        ``gen``: the watch's generation; a watch SIGHUP replaced installs nothing."""
        with self._exclusive():  # stale files leave while no reader is between stat and note
            if gen is not None and gen != self.gen:
                return
            if self._installed is not None and catalog.same(self._installed):
                log.debug("manifest %s read again unchanged: nothing to install", path or self._settings().manifest_source)
                return  # a reload would only cost readers their place (a ConfigMap resync, a touch)
            stale = self._install_parts(catalog)
            self._installed = catalog
        if stale:
            log.info("manifest asks for another version, size or checksum of %d cached file(s); fetching again",
                     len(stale))
        jobs = f" in {len(catalog.jobs)} job(s)" if catalog.jobs is not None else ""
        log.info("manifest %s: %d entries%s", path or self._settings().manifest_source, len(catalog), jobs)

    def replace(self) -> None:
        """A fresh watch of the (possibly new) manifest path replaces the old one, whose installs are
        ignored from then on; the new manifest is read and installed before this returns. Raises
        S3CacheError when the new manifest does not load: the old watch then stays in force, still
        watching, so the next good edit is installed as before."""
        s = self._settings()
        path = s.manifest_source
        gen = self.gen + 1  # only replace() bumps it, and only the reload thread calls replace()
        watch = stop = catalog = None
        if path is not None:
            watch, stop = self._make_watch(str(path), s.manifest_is_dir, gen)
            if self.watch is not None:
                watch.carry_over(self.watch)  # a refused job keeps its version in force across SIGHUP
            try:
                catalog = watch.read()
            except BaseException:
                watch.stop()
                raise
        with self._cond:
            self.gen = gen
        with self._swap:
            old, old_stop = self.watch, self._stop
            self.watch, self._stop = watch, stop
            stopped = self._stopped
        if old is not None:
            old_stop.set()
            old.wake()
            old.stop()
        if stopped:  # the daemon stops: the new watch is not started (nor its version installed)
            if stop is not None:
                stop.set()
            return
        if watch is None:
            self.install(Catalog(), gen, "(none)")
            return
        self.install(catalog, gen, str(path))
        self.start_watch(watch)

    def stop(self) -> None:
        """Ask the current watch's thread to end (the daemon is stopping), and any watch ``replace``
        swaps in later."""
        with self._swap:
            self._stopped = True
            if self._stop is not None:
                self._stop.set()
            if self.watch is not None:
                self.watch.wake()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()


class Reload:
    """SIGHUP's thread (``loop``) and what it does (``reload``); see the module docstring.

    ``settings()`` / ``apply(merged)``: the daemon's settings, and installing new ones in the daemon and
    its parts (under the state lock); ``fit()``: evict down to a smaller ``--max-size`` at once (takes the
    lease lock, then the state lock: called without either); ``revalidate(every)``: restart
    ``--revalidate``'s thread;
    ``work_changed()``: wake the workers (state lock held); ``progress_line()``: for READY=1's STATUS=."""

    def __init__(self, *, flags: dict[str, Any], config_file: Path | None, hup: threading.Event,
                 stopping: threading.Event, cond: threading.Condition, settings: Callable[[], Settings],
                 apply: Callable[[Settings], None], revalidate: Callable[[float], None],
                 manifests: Manifests, work_changed: Callable[[], None],
                 progress_line: Callable[[], str], fit: Callable[[], object] = lambda: None) -> None:
        self._flags = flags
        self._fit = fit
        self._config_file = config_file
        self._hup = hup
        self._stopping = stopping
        self._cond = cond
        self._settings = settings
        self._apply = apply
        self._revalidate = revalidate
        self._manifests = manifests
        self._work_changed = work_changed
        self._progress_line = progress_line

    def loop(self) -> None:
        while True:
            self._hup.wait()
            if self._stopping.is_set():
                return
            self._hup.clear()
            self.reload()

    def reload(self) -> None:
        """Re-read the configuration (as serve read it) and the manifest, keeping the cache and readers.
        Settings that cannot change live are logged as needing a restart; a bad configuration keeps
        the running one and says why."""
        from s3cache.service.config_sources import load

        notify.reloading()
        log.info("reloading the configuration and the manifest (SIGHUP)")
        try:
            new = load(self._flags, config=self._config_file).settings
        except S3CacheError as e:
            log.error("configuration not reloaded, keeping the running one: %s", e)
            notify.ready(f"reload failed: {e}".replace("\n", " "))
            return
        old = self._settings()
        merged, later = merge_settings(old, new)
        if later:
            log.warning("changed settings that take effect only after a restart: %s", ", ".join(later))
        with self._cond:
            self._apply(merged)
        logging.getLogger().setLevel(merged.log_level.upper())
        if merged.revalidate != old.revalidate:
            self._revalidate(merged.revalidate)
        try:
            self._manifests.replace()
        except S3CacheError as e:
            log.error("manifest not reloaded, keeping the previous one: %s", e)
            if self._manifests.watch is not None:
                self._manifests.watch.refused(str(e))  # in status and the metric until one installs
            notify.ready(f"manifest not reloaded: {e}".replace("\n", " "))
            return
        finally:
            # Ready bytes never exceed --max-size, not even until the next admission; after the manifest,
            # which may pin or unpin files. Also when --max-size did not shrink now: downloads admitted
            # before an earlier shrink may have landed above it since (fit does nothing when within it).
            self._fit()
        with self._cond:
            self._work_changed()
            self._cond.notify_all()
        notify.ready(self._progress_line())
