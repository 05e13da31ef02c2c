"""A watcher on file events (inotify, through watchdog's observer), not on polling: it hears of every file
created, written, or renamed into place under a directory, the moment the kernel reports it, and reads
the file then. A file that appears and is removed again between two polls cannot slip past it: its event
is kept even when the file is gone before it could be read.

Used by the guarantee tests (a mismatching object never appears under the cache root; nothing is created
outside it) and the integrity tests (every file published is right as it appears).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver


@dataclass
class Seen:
    """One file event: where, what kind, and the bytes read at that moment (None if already gone)."""

    path: str
    kind: str
    data: bytes | None


class FileEvents(FileSystemEventHandler):
    """Every file that appears under ``root`` (recursively, directories made later included), as events.

    ``skip(path) -> bool`` leaves some paths out (the cache's private directory, say); ``read=False``
    records paths only. ``files`` is every event on a file, in order; ``dirs`` every directory created.
    Use as a context manager; ``root`` must exist before it starts. Leaving it waits until the events of
    everything done before have been delivered (a sentinel file's own event comes after them: inotify
    keeps order, and watchdog holds a rename's first half back a while to pair it), then stops.
    """

    SENTINEL = ".fileevents-sync"

    _KINDS = {FileCreatedEvent: "created", FileModifiedEvent: "modified", FileClosedEvent: "closed",
              FileMovedEvent: "moved"}

    def __init__(self, root: Path, skip: Callable[[str], bool] = lambda p: False, read: bool = True) -> None:
        self.root = str(root)
        self.skip = skip
        self.read = read
        self.lock = threading.Lock()
        self.files: list[Seen] = []
        self.dirs: list[str] = []
        self._observer = InotifyObserver()
        self._synced = threading.Event()
        self._sentinel = os.path.join(self.root, f"{self.SENTINEL}.{os.getpid()}")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent):
            with self.lock:
                self.dirs.append(os.fsdecode(event.src_path))
            return
        kind = self._KINDS.get(type(event))
        if kind is None:
            return  # opened / closed without writing / deleted: nothing new to see
        path = os.fsdecode(event.dest_path if isinstance(event, FileMovedEvent) else event.src_path)
        if path == self._sentinel:
            self._synced.set()
            return
        if self.skip(path):
            return
        data = None
        if self.read:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                pass
        with self.lock:
            self.files.append(Seen(path, kind, data))

    def paths(self) -> set[str]:
        with self.lock:
            return {s.path for s in self.files}

    def __enter__(self) -> FileEvents:
        self._observer.schedule(self, self.root, recursive=True)
        self._observer.start()
        return self

    def sync(self, timeout: float = 60) -> None:
        """Return once every event of what was done before this call has been recorded."""
        self._synced.clear()
        with open(self._sentinel, "wb"):
            pass
        try:
            if not self._synced.wait(timeout):
                raise TimeoutError(f"no inotify event for {self._sentinel} in {timeout}s")
        finally:
            os.unlink(self._sentinel)

    def __exit__(self, *exc) -> None:
        try:
            self.sync()
        finally:
            self._observer.stop()
        self._observer.join(30)
