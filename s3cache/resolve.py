"""``resolve()``: from ``s3://bucket/key`` to a local path whose bytes were verified, waiting if needed.

Fast path (the file is there): under the cache's lease lock, held shared, ``stat`` the candidate paths
and send the daemon one usage note for the whole batch over a connection kept open. No round trip, no
index access: a few syscalls per call. The shared lock is what makes the lease exact: eviction takes it
exclusively and reads every pending note first, so a file this function returns is never evicted within
its lease.

Slow path (a file is missing): ask the daemon over ``ctl.sock`` (which puts the objects at the front of
its queue), then sleep until a file event (watchdog/inotify) or a daemon message says something changed.
A failed object raises FetchFailed with its S3 error code at once; a vanished daemon raises
DaemonNotRunning at once; ``timeout`` raises ResolveTimeout.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from . import paths
from .config import default_cache_dir
from .control import Client, UseNotes
from .errors import FetchFailed, ResolveTimeout, UnsafeKey
from .refs import ObjectRef, parse_uri
from .store import Layout

WANT_WINDOW = 16  # how many missing files a streaming reader asks for at once


class Resolver:
    """Per-process handle on one cache dir (cached by ``resolver_for``)."""

    def __init__(self, cache_dir: str) -> None:
        self.root = os.path.abspath(cache_dir)
        self.layout = Layout(self.root)
        self._lease_fd: int | None = None
        self._pid = os.getpid()
        self._reader = f"{socket.gethostname()}:{self._pid}"
        self._notes = UseNotes(self.layout.use_socket, self._reader)

    # -- fast path ---------------------------------------------------------------------------------

    def _find(self, ref: ObjectRef) -> str | None:
        for rel in paths.candidates(ref):
            p = self.root + "/" + rel
            try:
                if stat.S_ISREG(os.stat(p).st_mode):
                    return p
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    @contextmanager
    def _shared_lease(self):
        if self._lease_fd is None:
            try:
                self._lease_fd = os.open(os.path.join(self.layout.private, "lease.lock"),
                                         os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                yield  # no daemon ever ran here: nothing can evict
                return
        fcntl.flock(self._lease_fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lease_fd, fcntl.LOCK_UN)

    def reader_id(self) -> str:
        return self._reader

    def _note(self, uris: list[str], first_look: bool) -> None:
        self._notes.send("h" if first_look else "w", uris)

    def lookup(self, refs: Sequence[ObjectRef], first_look: bool = True) -> list[str | None]:
        """Paths of the files already present (None where missing), marking them used.

        ``first_look``: this is the reader's first look, so a file found counts as a cache hit."""
        with self._shared_lease():
            found = [self._find(r) for r in refs]
            used = [r.uri for r, p in zip(refs, found) if p is not None]
            if used:
                self._note(used, first_look)
        return found

    # -- slow path ---------------------------------------------------------------------------------

    def wait(self, refs: Sequence[ObjectRef], deadline: float | None,
             client: Client | None = None, also: Sequence[ObjectRef] = ()) -> list[str]:
        """Ask the daemon for ``refs`` (and ``also``, without waiting for those) and block until all of
        ``refs`` are present. Returns their paths in order."""
        own = client is None
        client = client or Client(self.layout.control_socket, self.root)
        try:
            return self._wait(refs, deadline, client, also)
        finally:
            if own:
                client.close()

    def _want(self, client: Client, refs: Sequence[ObjectRef], also: Sequence[ObjectRef]) -> set[str]:
        reply = client.request({"op": "want", "reader": self.reader_id(), "uris": [r.uri for r in refs],
                                "ahead": [r.uri for r in also]})
        watch: set[str] = set()
        for res in reply.get("results", []):
            _raise_for(res)
            if res["state"] == "pending":
                watch.add(os.path.join(self.root, res.get("watch", "")))
        return watch

    def _wait(self, refs: Sequence[ObjectRef], deadline: float | None, client: Client,
              also: Sequence[ObjectRef]) -> list[str]:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                try:
                    os.write(wfd, b"x")
                except BlockingIOError:
                    pass  # the pipe is full: a wake-up is already pending

        observer = Observer()
        watched: set[str] = set()
        result: list[str | None] = [None] * len(refs)
        try:
            pending = list(range(len(refs)))
            asked = False
            while True:
                found = self.lookup([refs[i] for i in pending], first_look=False)
                for i, p in zip(list(pending), found):
                    if p is not None:
                        result[i] = p
                pending = [i for i in pending if result[i] is None]
                if not pending:
                    return [p for p in result if p is not None]
                if not asked:
                    # Watch before asking, so a file landing in between still wakes us.
                    for d in self._want(client, [refs[i] for i in pending], also) - watched:
                        if os.path.isdir(d):
                            observer.schedule(Wake(), d, recursive=False)
                            watched.add(d)
                    if not observer.is_alive():
                        observer.daemon = True
                        observer.start()
                    asked = True
                    continue  # re-check: the file may have landed before the watch was in place
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ResolveTimeout(
                        f"{len(pending)} file(s) not ready in time, first {refs[pending[0]].uri}")
                if not client.buffered():
                    r, _, _ = select.select([rfd, client.fileno()], [], [], remaining)
                    if rfd in r:
                        os.read(rfd, 4096)
                    if client.fileno() not in r:
                        continue
                event = client.receive()  # raises DaemonNotRunning if the daemon went away
                if event.get("event") == "failed" and event.get("uri") in {refs[i].uri for i in pending}:
                    _raise_for({"state": "failed", **event})
                # Any other event (a "ready", or news about a file asked for ahead) just means: look again.
        finally:
            if observer.is_alive():
                observer.stop()
                observer.join(timeout=5)
            os.close(rfd)
            os.close(wfd)


def _raise_for(res: dict) -> None:
    state = res.get("state")
    if state == "failed":
        raise FetchFailed(res["uri"], res.get("code", "Unknown"), res.get("message", ""))
    if state == "invalid":
        raise UnsafeKey(res.get("message", f"invalid URI {res.get('uri')!r}"))


_resolvers: dict[str, Resolver] = {}


def resolver_for(cache_dir: str | os.PathLike | None) -> Resolver:
    root = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir())
    r = _resolvers.get(root)
    if r is None or r._pid != os.getpid():  # after fork, sockets and locks must be our own
        r = _resolvers[root] = Resolver(root)
    return r


def resolve(uris: str | ObjectRef | Iterable[str | ObjectRef], *, cache_dir: str | os.PathLike | None = None,
            timeout: float | None = None) -> str | list[str]:
    """Local path(s) of verified cached copies of ``uris``, waiting for files still on their way.

    ``resolve("s3://b/k") -> str``; ``resolve([...]) -> list[str]`` in the same order. The cache dir is
    ``cache_dir``, else ``$S3CACHE_DIR``, else ``/var/cache/s3cache``. Each returned file is leased:
    the daemon will not evict it for ``--lease`` seconds.

    Raises FetchFailed (with the S3 error code) when an object cannot be fetched, DaemonNotRunning when a
    file is missing and no daemon serves the cache dir, ResolveTimeout when ``timeout`` seconds pass,
    UnsafeKey for a malformed URI. All derive from S3CacheError.
    """
    single = isinstance(uris, (str, ObjectRef))
    refs = [parse_uri(u) for u in ([uris] if single else uris)]  # type: ignore[list-item]
    r = resolver_for(cache_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    found = r.lookup(refs)
    missing = [i for i, p in enumerate(found) if p is None]
    if missing:
        got = r.wait([refs[i] for i in missing], deadline)
        for i, p in zip(missing, got):
            found[i] = p
    out = [p for p in found if p is not None]
    return out[0] if single else out


def iter_resolve(uris: Iterable[str | ObjectRef], *, cache_dir: str | os.PathLike | None = None,
                 timeout: float | None = None) -> Iterator[str]:
    """Yield each URI's local path in order, as soon as that file is there.

    Each file is looked up (and marked used) only when the consumer asks for it, so the daemon learns
    where the reader really is and its lease starts when the reader is about to open it. A file already
    cached costs no round trip; for a missing one the daemon is asked for it and the next few missing
    ones together, over one connection kept open. ``timeout`` bounds the wait for each file.
    """
    r = resolver_for(cache_dir)
    refs = [parse_uri(u) for u in uris]
    client: Client | None = None
    try:
        for i, ref in enumerate(refs):
            p = r.lookup([ref])[0]
            if p is None:
                if client is None:
                    client = Client(r.layout.control_socket, r.root)
                ahead = [a for a in refs[i + 1 : i + WANT_WINDOW] if r._find(a) is None]
                deadline = None if timeout is None else time.monotonic() + timeout
                p = r.wait([ref], deadline, client, also=ahead)[0]
            yield p
    finally:
        if client is not None:
            client.close()
