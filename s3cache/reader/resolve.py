"""``resolve()``: from ``s3://bucket/key`` to a local path whose bytes were verified, waiting if needed.

Fast path (the file is there, not marked superseded): under the cache's lease lock, held shared,
``stat`` the candidate paths and send the daemon one usage note for the whole batch over a connection
kept open. No round trip, no index access: a few syscalls per call. The shared lock is what makes the
lease exact: eviction takes it exclusively and reads every pending note first, so a file this function
returns is never evicted within its lease. ``flock`` belongs to the open file description, which all
threads of a process share, so the process holds it through one counted lock (``SharedLease``): taken on
the first holder, released after the last, never dropped by one thread under another.

Slow path (a file is missing): ask the daemon over ``ctl.sock`` (which puts the objects at the front of
its queue), then sleep until it pushes news of them ("ready" or "failed"). A file the daemon calls ready
that is not there when we look (evicted in between) is asked for again. Waiting depends on no directory
of the key existing (the store creates them only when it publishes). A failed object raises FetchFailed
with its S3 error code at once; a vanished daemon raises DaemonNotRunning at once (a dropped connection
is reopened first); ``timeout`` raises ResolveTimeout, including while waiting for the lease lock.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from s3cache.errors import (
    DaemonNotRunning,
    FetchFailed,
    OutOfScope,
    RequestRefused,
    ResolveTimeout,
    S3CacheError,
    UnsafeKey,
)
from s3cache.manifest.refs import ObjectRef, format_uri, parse_uri
from s3cache.policy import order
from s3cache.service.config import default_cache_dir
from s3cache.store import paths
from s3cache.store.layout import SUPERSEDED_BIT, Layout

from .client import Client, UseNotes
from .lease import SharedLease
from .trust import trusted_owner
from .wire import MAX_AHEAD, MAX_URIS

WANT_WINDOW = 16  # how many missing files a streaming reader asks for at once
SAFETY_LOOK = 5.0  # seconds between looks while waiting for news, should a push ever go missing
EXPLAIN_GRACE = 1.0  # seconds past the deadline a timed-out resolve() asks the daemon why, at most
RECONNECTS = 5  # fresh ctl.sock connections one wait may open before giving up


class Resolver:
    """Per-process handle on one cache dir (cached by ``resolver_for``); safe to share between threads."""

    def __init__(self, cache_dir: str) -> None:
        self.root = os.path.abspath(cache_dir)
        self.layout = Layout(self.root)
        self._owner: int | None = None  # the cache dir's trusted owner, once it exists (trusted_owner)
        self._pid = os.getpid()
        self._reader = f"{socket.gethostname()}:{self._pid}"
        self._notes = UseNotes(self.layout.use_socket, self._reader)
        self._lease = SharedLease(self.layout.lease_lock)

    # -- fast path ---------------------------------------------------------------------------------

    def _find(self, ref: ObjectRef) -> str | None:
        """The cached file of ``ref``: a regular file (not a symlink) owned by the cache dir's owner and
        not marked superseded (``SUPERSEDED_BIT``: S3 holds a newer version, which the daemon is fetching;
        the mode comes with the lstat, so the check is free), or None. Raises UntrustedCacheDir for a
        cache dir the daemon would refuse (``trusted_owner``)."""
        if self._owner is None:
            self._owner = trusted_owner(self.root)
            if self._owner is None:
                return None  # no cache dir yet: nothing is cached
        for rel in paths.candidates(ref):
            p = self.root + "/" + rel
            try:
                st = os.lstat(p)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == self._owner and not st.st_mode & SUPERSEDED_BIT:
                return p
        return None

    @contextmanager
    def _shared_lease(self, deadline: float | None = None):
        held = self._lease.acquire(deadline)
        try:
            yield
        finally:
            if held:
                self._lease.release()

    def reader_id(self) -> str:
        return self._reader

    def _note(self, uris: list[str], first_look: bool) -> None:
        self._notes.send("h" if first_look else "w", uris)

    def lookup(self, refs: Sequence[ObjectRef], first_look: bool = True,
               deadline: float | None = None) -> list[str | None]:
        """Paths of the files already present (None where missing), marking them used.

        ``first_look``: this is the reader's first look, so a file found counts as a cache hit.
        ``deadline`` (monotonic) bounds the wait for the lease lock."""
        with self._shared_lease(deadline):
            found = [self._find(r) for r in refs]
            used = [r.uri for r, p in zip(refs, found) if p is not None]
            if used:
                self._note(used, first_look)
        return found

    def close(self) -> None:
        self._notes.close()
        self._lease.close()

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

    def _want(self, client: Client, refs: Sequence[ObjectRef], also: Sequence[ObjectRef],
              deadline: float | None = None) -> dict[str, str]:
        """Ask for ``refs`` (in requests of at most MAX_URIS); their states by URI. Raises for a failed or
        invalid one. Each request waits at most until ``deadline`` (monotonic): DaemonNotRunning past it."""
        states: dict[str, str] = {}
        hints = [r.uri for r in also][:MAX_AHEAD]
        for i in range(0, len(refs), MAX_URIS):
            chunk = refs[i : i + MAX_URIS]
            # the thread names which of the process's files are fresh, as usage notes do (client.UseNotes)
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            reply = client.request({"op": "want", "reader": f"{self.reader_id()}/{threading.get_ident()}",
                                    "uris": [r.uri for r in chunk],
                                    "ahead": hints if i == 0 else []}, timeout=left)
            for res in reply.get("results", []):
                _raise_for(res)
                states[res.get("uri", "")] = res.get("state", "")
        return states

    def _wait(self, refs: Sequence[ObjectRef], deadline: float | None, client: Client,
              also: Sequence[ObjectRef]) -> list[str]:
        result: list[str | None] = [None] * len(refs)
        pending = list(range(len(refs)))
        outstanding: set[str] = set()  # answered "pending": the daemon will push news of these
        hints = list(also)
        gone = 0  # times the daemon said "ready" and the file was not there when we looked
        ask_after = 0.0  # monotonic time before which we do not ask again (after repeated "gone")
        reconnects = 0
        while True:
            found = self.lookup([refs[i] for i in pending], first_look=False, deadline=deadline)
            for i, p in zip(list(pending), found):
                if p is not None:
                    result[i] = p
            pending = [i for i in pending if result[i] is None]
            if not pending:
                return [p for p in result if p is not None]
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ResolveTimeout(self._timed_out(client, [refs[i] for i in pending]))
            ask = [refs[i] for i in pending if refs[i].uri not in outstanding]
            now = time.monotonic()
            if ask and now >= ask_after:
                try:
                    states = self._want(client, ask, hints, deadline)
                except DaemonNotRunning:
                    if deadline is not None and time.monotonic() >= deadline:  # it did not answer in time
                        raise ResolveTimeout(self._timed_out(client, [refs[i] for i in pending])) from None
                    reconnects = self._reconnect(client, reconnects)
                    outstanding.clear()
                    continue
                hints = []
                outstanding |= {u for u, s in states.items() if s == "pending"}
                if any(s == "ready" for s in states.values()):
                    if gone:  # it was evicted between answer and look before: do not spin on it
                        ask_after = time.monotonic() + min(0.01 * 2 ** gone, 1.0)
                    gone += 1
                    continue  # look again now: the daemon says it is there
            wait = SAFETY_LOOK if remaining is None else min(remaining, SAFETY_LOOK)
            if ask:
                wait = min(wait, max(0.0, ask_after - now))
            if not client.buffered():
                # poll, not select: a training process may hold more than 1024 open files, and
                # select() cannot take a descriptor numbered past that
                poller = select.poll()
                poller.register(client.fileno(), select.POLLIN)
                if not poller.poll(wait * 1000):
                    continue  # look again (and ask again, if it is time)
            try:
                event = client.receive()
            except DaemonNotRunning:
                reconnects = self._reconnect(client, reconnects)
                outstanding.clear()
                continue
            uri = event.get("uri")
            if event.get("event") == "failed" and uri in {refs[i].uri for i in pending}:
                _raise_for({"state": "failed", **event})
            # Any other news (a "ready", or about a file asked for ahead) just means: look again.
            outstanding.discard(uri)

    def _timed_out(self, client: Client, refs: Sequence[ObjectRef]) -> str:
        """The ResolveTimeout message: how many, the first, and what the daemon says about it
        (``explain``): queued behind N, fetching at X MB/s, waiting for space held by leases, failed."""
        text = f"{len(refs)} file(s) not ready in time, first {refs[0].display}"
        try:
            reply = client.request({"op": "explain", "uris": [refs[0].uri]}, timeout=EXPLAIN_GRACE)
            why = reply.get("results", [{}])[0].get("text")
        except (S3CacheError, OSError, IndexError, AttributeError):
            return text + " (the daemon did not say why)"
        return f"{text}: {why}" if why else text

    def announce(self, client: Client, shuffled: Shuffled, epoch: int, start: int = 0) -> bool:
        """Tell the daemon the order this process will read ``shuffled`` in during ``epoch`` (from
        index ``start`` of it) in one ``order`` message; the list itself crosses once per daemon, and
        only when it is not the daemon's manifest (or its ``--shard`` share). False if the daemon did
        not take it (an older daemon): reading works the same, the daemon just cannot plan for it."""
        msg = {"op": "order", "reader": self.reader_id(), "seed": shuffled.seed & order.M64,
               "epoch": epoch & order.M64, "n": len(shuffled.refs), "start": start, "list": shuffled.digest}
        for _ in range(2):
            try:
                client.request(msg)
                return True
            except RequestRefused as e:
                if e.code != "UnknownList":
                    return False
            uris = shuffled.identities
            for offset, chunk in order.chunks(uris):
                try:
                    client.request({"op": "order_list", "list": shuffled.digest, "offset": offset,
                                    "n": len(uris), "uris": chunk})
                except RequestRefused:
                    return False
        return False

    def _reconnect(self, client: Client, done: int) -> int:
        """The daemon closed our connection: open a new one (raises DaemonNotRunning if none answers)."""
        if done >= RECONNECTS:
            raise DaemonNotRunning(f"{self.root} (the daemon closed the connection {done} times)")
        client.reconnect()
        return done + 1


class Shuffled:
    """A reader's list read in a new order every epoch: ``refs[order.permutation(n, seed, epoch)[k]]``.

    Holds what is computed once per list, not per epoch: the refs, their identities and the digest
    that names the list to the daemon (``order.list_digest`` of the identities)."""

    def __init__(self, refs: Sequence[ObjectRef], seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"shuffle_seed must be an int, not {type(seed).__name__}")
        self.refs = list(refs)
        self.seed = seed
        self._digest: str | None = None

    @property
    def identities(self) -> list[str]:
        return [r.uri for r in self.refs]

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = order.list_digest(r.uri for r in self.refs)
        return self._digest

    def epoch(self, epoch: int) -> list[ObjectRef]:
        return [self.refs[i] for i in order.permutation(len(self.refs), self.seed, epoch)]


def _raise_for(res: dict) -> None:
    state = res.get("state")
    if state == "failed":
        if res.get("code") == OutOfScope.code:
            raise OutOfScope(format_uri(res["uri"]), res.get("message", ""))
        raise FetchFailed(format_uri(res["uri"]), res.get("code", "Unknown"), res.get("message", ""))
    if state == "invalid":
        raise UnsafeKey(res.get("message", f"invalid URI {res.get('uri')!r}"))


_resolvers: dict[str, Resolver] = {}
_resolvers_lock = threading.Lock()


def resolver_for(cache_dir: str | os.PathLike | None) -> Resolver:
    root = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir())
    with _resolvers_lock:
        r = _resolvers.get(root)
        if r is None or r._pid != os.getpid():  # after fork, sockets and locks must be our own
            r = _resolvers[root] = Resolver(root)
        return r


def reset() -> None:
    """Close every cache dir's process-wide reader state (its lease-lock descriptor and usage
    connection). The next ``resolve`` opens them again; for tests, and for long-lived processes done
    with a cache dir."""
    with _resolvers_lock:
        rs = list(_resolvers.values())
        _resolvers.clear()
    for r in rs:
        if r._pid == os.getpid():
            r.close()


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
    found = r.lookup(refs, deadline=deadline)
    missing = [i for i, p in enumerate(found) if p is None]
    if missing:
        got = r.wait([refs[i] for i in missing], deadline)
        for i, p in zip(missing, got):
            found[i] = p
    out = [p for p in found if p is not None]
    return out[0] if single else out


def iter_resolve(uris: Iterable[str | ObjectRef], *, cache_dir: str | os.PathLike | None = None,
                 timeout: float | None = None, shuffle_seed: int | None = None, epoch: int = 0,
                 start: int = 0) -> Iterator[str]:
    """Yield each URI's local path in order, as soon as that file is there.

    Each file is looked up (and marked used) only when the consumer asks for it, so the daemon learns
    where the reader really is and its lease starts when the reader is about to open it. A file already
    cached costs no round trip; for a missing one the daemon is asked for it and the next few missing
    ones together, over one connection kept open. ``timeout`` bounds the wait for each file.

    With ``shuffle_seed`` the files come in epoch ``epoch``'s order instead: ``uris[p[k]]`` for
    ``p = order.permutation(len(uris), shuffle_seed, epoch)``, the same on every host and in every run
    (``s3cache.tf.files`` uses it, one epoch per iteration); ``start`` skips the first ``start`` files
    of that order (resuming from a checkpoint). Before the first file the reader announces the order
    to the daemon in one message, so that it prefetches in that order and evicts the file needed
    furthest in the future.
    """
    r = resolver_for(cache_dir)
    refs = [parse_uri(u) for u in uris]
    plan = None if shuffle_seed is None else Shuffled(refs, shuffle_seed)
    yield from _iterate(r, refs, timeout, plan, epoch, start)


def _iterate(r: Resolver, refs: list[ObjectRef], timeout: float | None, plan: Shuffled | None,
             epoch: int, start: int) -> Iterator[str]:
    client: Client | None = None
    if plan is not None:
        refs = plan.epoch(epoch)[start:]
        try:
            client = Client(r.layout.control_socket, r.root)
            r.announce(client, plan, epoch, start)
        except DaemonNotRunning:
            if client is not None:
                client.close()
            client = None  # every file may be cached: a missing one raises DaemonNotRunning below
    try:
        for i, ref in enumerate(refs):
            deadline = None if timeout is None else time.monotonic() + timeout
            p = r.lookup([ref], deadline=deadline)[0]
            if p is None:
                if client is None:
                    client = Client(r.layout.control_socket, r.root)
                ahead = [a for a in refs[i + 1 : i + WANT_WINDOW] if r._find(a) is None]
                p = r.wait([ref], deadline, client, also=ahead)[0]
            yield p
    finally:
        if client is not None:
            client.close()
