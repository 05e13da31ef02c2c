"""The manifest as the daemon sees it: read it (expanding ``prefix/`` lines by listing S3), watch its
file, and hand each new version to ``install``.

Owns the file's identity when last read, the errors of the last read (listing failures, shown in
status), the watchdog observer and the reload thread's wake-up event.

Invariants it keeps:

* an edit made after the daemon read the manifest is never missed: the watch starts before the daemon
  serves, and a change between the read and the watch triggers a reload;
* a burst of file events (write, close, rename) becomes one reload;
* a manifest that fails to parse is not installed: the previous one stays.

No lock of its own: ``read`` runs on one thread at a time (start-up, then the reload thread only), and
``install`` (a callable handed at construction) takes the daemon's state lock itself.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from . import manifest as manifest_mod
from .catalog import Catalog
from .errors import FetchFailed, S3CacheError
from .fetch import Cancelled
from .manifest import Listed

log = logging.getLogger("s3cache.daemon")

SETTLE = 0.05  # seconds: events of one save come within a millisecond or two


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class ManifestWatch:
    def __init__(self, path: str, *, lister: Callable[[str, str], list[Listed]],
                 install: Callable[[Catalog], None], stopping: threading.Event) -> None:
        self.path = path
        self._lister = lister  # Fetcher.list
        self._install = install
        self._stopping = stopping
        self._reload = threading.Event()
        self._seen: tuple[int, int, int] | None = None
        self._observer = None
        self.errors: list[str] = []

    def read(self) -> Catalog:
        """Parse the manifest and list its prefixes. Raises ManifestError (S3CacheError)."""
        path = self.path
        errors: list[str] = []

        def lister(bucket: str, prefix: str):
            try:
                return self._lister(bucket, prefix)
            except (FetchFailed, Cancelled) as e:
                errors.append(f"{path}: cannot list s3://{bucket}/{prefix}: {e}")
                log.error("%s", errors[-1])
                return []

        self._seen = _identity(path)
        catalog = Catalog.build(manifest_mod.expand(manifest_mod.read(path), lister))
        self.errors = errors
        return catalog

    def watch(self) -> None:
        """Start watching the file's directory; run ``reload_loop`` on a thread of the caller's."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        target = os.path.abspath(self.path)
        reload = self._reload

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
                if target in paths and event.event_type in ("created", "modified", "moved", "closed"):
                    reload.set()

        # Watch the directory, not the file: editors save by renaming a new file over the old one.
        obs = Observer()
        obs.schedule(Handler(), os.path.dirname(target), recursive=False)
        obs.daemon = True
        obs.start()
        self._observer = obs
        if _identity(target) != self._seen:
            reload.set()  # it changed between our reading it and the watch starting

    def reload_loop(self) -> None:
        """The reload thread: read and install the manifest after each change, until stopping."""
        while True:
            self._reload.wait()
            if self._stopping.is_set():
                return
            # Let a burst of events (write, close, rename) settle into one reload. They come within
            # a millisecond or two; a longer settle only delays a job that just wrote its manifest.
            while self._reload.is_set():
                self._reload.clear()
                if self._stopping.wait(SETTLE):
                    return
            try:
                self._install(self.read())
            except S3CacheError as e:
                log.error("manifest not reloaded, keeping the previous one: %s", e)

    def wake(self) -> None:
        """Let the reload thread see that the daemon stops."""
        self._reload.set()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
