"""The peer tier inside the daemon: built from the settings, wired to the parts, started and stopped
by the root. What it adds (``s3cache.peer`` has the pieces):

* the workers fetch through ``source`` (``PeerSource``): an object another host owns is asked of it
  first, S3 otherwise;
* the listener (``PeerServer``) serves a peer this host's published files. ``find`` looks an object up
  by its URI in the space (the index's files) and serves it only if it is in the manifest in force
  (any share of it, under ``--shard``); an
  object not fetched yet is wanted as a reader wants it (``Readers.want``: at the front of the queue,
  fetched once however many ask) and the request waits for it up to the peer's deadline;
* with a file or ``dns:`` for ``--peers``, a thread reads the fleet again every ``REFRESH`` seconds.

Lock: the state lock only inside ``Readers.want``/``closed`` and around the space lookups; never held
while waiting or sending.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from s3cache.errors import ConfigError, S3CacheError
from s3cache.fetch.fetcher import Fetcher
from s3cache.manifest.refs import ObjectRef, from_identity
from s3cache.peer.client import PeerClient
from s3cache.peer.members import REFRESH, Health, Membership
from s3cache.peer.server import Found, PeerServer
from s3cache.peer.signing import read_secret
from s3cache.peer.source import PeerSource
from s3cache.service.config import Settings
from s3cache.store.files import Store

from .readers import Readers
from .schedule import Schedule
from .space import Space

READER = "peer"  # the name a peer's want is logged under (it is not noted as a reader)


class _Waiter:
    """Stands for a peer's request among a want's waiters: ``send`` is how Readers answers."""

    def __init__(self) -> None:
        self.answered = threading.Event()
        self.msg: dict | None = None

    def send(self, msg: dict) -> bool:
        self.msg = msg
        self.answered.set()
        return True


class Peering:
    """Invariant: ``server`` serves (from ``start`` on) only objects whose URI is in ``schedule.catalog`` and that the space
    holds as ready files; ``source`` is what the workers fetch through."""

    def __init__(self, s: Settings, fetcher: Fetcher, store: Store, cancel: threading.Event) -> None:
        self.me = s.peer_addr
        self.health = Health([], self.me)
        self.members = Membership(s.peers, s.peer_addr, self.health)
        self.health.set_hosts(self.members.hosts)
        secret = read_secret(s.peer_secret_file)
        client = PeerClient(secret, timeout=s.peer_timeout, new_temp=store.new_temp, discard=store.discard,
                            describe=fetcher.describe, cancel=cancel)
        self.source = PeerSource(fetcher, client, me=self.me, owner=self.members.owner, health=self.health,
                                  timeout=s.peer_timeout)
        self._stopping = cancel
        self._store = store
        self._parts: tuple[Space, Schedule, Readers, threading.Condition] | None = None
        self._edited: Callable[[], bool] = lambda: False
        # Bound now, served from ``start``: a peer that connects while this host reconciles waits in
        # the listen backlog instead of being refused (and marking this host out).
        try:
            self.server = PeerServer(self.me, secret, self.find, rate=s.peer_rate)
        except OSError as e:
            raise ConfigError(f"--peer-addr {self.me}: cannot listen there: {e.strerror}") from None

    def start(self, space: Space, schedule: Schedule, readers: Readers, cond: threading.Condition,
              edited: Callable[[], bool], spawn: Callable[..., threading.Thread]) -> None:
        """Serve peers (after the cache is reconciled and the manifest installed). ``edited``: whether
        the manifest on disk is newer than the one in force (an edit is on its way in). ``spawn``
        runs the membership refresh on a supervised thread (a file or DNS is read again)."""
        self._parts = (space, schedule, readers, cond)
        self._edited = edited
        self.server.start(spawn)  # supervised too: its listener's errors count in loop_errors
        if self.members.dynamic:
            spawn(self._refresh_loop, "s3cache-peers")

    def _refresh_loop(self) -> None:
        while not self._stopping.wait(REFRESH):
            self.members.refresh()

    def stop(self) -> None:
        self.server.stop()

    def find(self, raw: str, wait: float) -> Found | None:
        """The published file of ``raw`` (an object URI in the manifest), fetching it first if this host
        has not (waiting at most ``wait`` seconds); None if it is not served."""
        space, schedule, readers, cond = self._parts
        try:
            ref = from_identity(raw)
        except S3CacheError:  # not an object URI: nothing of ours
            return None
        deadline = time.monotonic() + wait
        while True:
            # Hosts see a new manifest at slightly different times: a peer may ask for an object of
            # the edit this host is still installing. Outside the manifest otherwise: not served.
            # Asked before the catalog is read: an edit installed in between is then in the catalog.
            editing = self._edited()
            with cond:
                # Under --shard another share's object is the manifest's too (the demand scope's own
                # rule): a sharded host owns objects of every share, by the URI's hash.
                catalog = schedule.catalog
                listed = catalog.position(ref.uri) is not None or catalog.off_share(ref.uri)
                found = self._ready(space, ref) if listed else None
            if listed or not editing or time.monotonic() > deadline or self._stopping.is_set():
                break
            time.sleep(0.05)
        if not listed:
            return None
        if found is not None or wait <= 0:
            return found
        waiter = _Waiter()
        try:
            answer = readers.want(waiter, READER, [ref.uri], counted=False)[0]
            if answer.get("state") == "pending":
                while not waiter.answered.wait(0.25):
                    if self._stopping.is_set() or time.monotonic() > deadline:
                        return None
            elif answer.get("state") != "ready":
                return None
        finally:
            readers.closed(waiter)
        with cond:
            return self._ready(space, ref)

    def _ready(self, space: Space, ref: ObjectRef) -> Found | None:
        """State lock held."""
        rel = space.ready_path(ref.uri)
        if rel is None:
            return None
        return Found(self._store.layout.abspath(rel))

    def status(self) -> dict:
        return {"me": self.me, "hosts": len(self.members.hosts), "membership_changes": self.members.changes,
                **self.health.status(time.time()),
                **self.source.status(), **self.server.status()}


def build(s: Settings, fetcher: Fetcher, store: Store, cancel: threading.Event) -> Peering | None:
    """The peer tier when ``--peers`` is given, else None. Raises ConfigError (a bad list, a secret
    that cannot be read)."""
    return Peering(s, fetcher, store, cancel) if s.peers is not None else None

