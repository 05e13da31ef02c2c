"""The demand queue: objects readers wait on or will soon want, served before prefetch (see schedule.py);
and ``OutsideDemand``, how many waits on objects the manifest does not list each reader may hold.

Readers' demand outside the manifest costs a queue entry, a GET and memory, and nothing in the manifest
bounds it. ``OutsideDemand`` counts (connection, object) waits outside the manifest per connection, per
uid (the connection's SO_PEERCRED uid) and in all, and refuses a new one past any cap. Used by
``Readers`` under the daemon's state lock; it takes no lock of its own and touches no socket.
Invariants: every counted wait is one ``conn`` in ``waiting[conn]``; ``per_uid`` and ``total`` are the
sums of those sets; a wait leaves the count when its object lands or fails (``done``) or its connection
closes (``closed``), so a client that left costs nothing afterwards.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Protocol

from s3cache.manifest.parse import Entry


class DemandQueue:
    """The demand queue: entries in lanes, one per uid whose readers asked for them (``claim``) and one
    (``None``) for the daemon's own (hints, retries, pins), served round robin: ``popleft`` takes the
    front of the next lane in turn, so one uid asking for thousands of objects puts another uid's want
    behind at most one of its own per turn. Within a lane it behaves as a deque (``appendleft`` is the
    front), as the whole queue did before lanes.

    Beside it, the count of each URI, so "is it queued?" costs a dict lookup, not a scan (60,000 hints
    once took minutes under the state lock). Invariants: ``_count[uri]`` is the number of entries of
    ``uri`` in all lanes (absent when 0); ``_len`` is their total; no lane is empty; a claim is dropped
    when its URI leaves the queue. Iteration gives the order ``popleft`` would serve them in."""

    def __init__(self, items: Iterable[Entry] = ()) -> None:
        self._lanes: dict[object, deque[Entry]] = {}  # in turn order: the next lane served is first
        self._count: dict[str, int] = {}
        self._owner_of: dict[str, object] = {}  # uri -> the uid whose want queues it next
        self._len = 0
        self.extend(items)

    def claim(self, uri: str, owner: object) -> None:
        """The next entry of ``uri`` goes in ``owner``'s lane (a want of that uid's reader)."""
        self._owner_of[uri] = owner

    def _lane(self, e: Entry) -> deque[Entry]:
        owner = self._owner_of.get(e.uri)
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
        return lane

    def _inc(self, e: Entry) -> None:
        self._count[e.uri] = self._count.get(e.uri, 0) + 1
        self._len += 1

    def _dec(self, e: Entry) -> None:
        self._len -= 1
        n = self._count[e.uri] - 1
        if n:
            self._count[e.uri] = n
        else:
            del self._count[e.uri]
            self._owner_of.pop(e.uri, None)

    def append(self, e: Entry) -> None:
        self._lane(e).append(e)
        self._inc(e)

    def appendleft(self, e: Entry) -> None:
        self._lane(e).appendleft(e)
        self._inc(e)

    def extend(self, items: Iterable[Entry]) -> None:
        for e in items:
            self.append(e)

    def extendleft(self, items: Iterable[Entry]) -> None:
        for e in items:
            self.appendleft(e)

    def popleft(self) -> Entry:
        if not self._lanes:
            raise IndexError("pop from an empty demand queue")
        owner = next(iter(self._lanes))
        lane = self._lanes.pop(owner)
        e = lane.popleft()
        if lane:
            self._lanes[owner] = lane  # to the end of the turn
        self._dec(e)
        return e

    def pop(self) -> Entry:
        if not self._lanes:
            raise IndexError("pop from an empty demand queue")
        owner = next(reversed(self._lanes))
        lane = self._lanes[owner]
        e = lane.pop()
        if not lane:
            del self._lanes[owner]
        self._dec(e)
        return e

    def clear(self) -> None:
        self._lanes.clear()
        self._count.clear()
        self._owner_of.clear()
        self._len = 0

    def remove(self, e: Entry) -> None:
        for owner, lane in self._lanes.items():
            if e in lane:
                lane.remove(e)
                if not lane:
                    del self._lanes[owner]
                self._dec(e)
                return
        raise ValueError(f"{e.uri} is not queued")

    def drop(self, uris: set[str]) -> int:
        """Remove every entry of these URIs (one pass, whatever their number); how many were removed."""
        if not any(u in self._count for u in uris):
            return 0
        removed = 0
        for owner in list(self._lanes):
            lane = self._lanes[owner]
            keep = deque(e for e in lane if e.uri not in uris)
            for e in lane:
                if e.uri in uris:
                    self._dec(e)
                    removed += 1
            if keep:
                self._lanes[owner] = keep
            else:
                del self._lanes[owner]
        return removed

    def has(self, uri: str) -> bool:
        return uri in self._count

    def __contains__(self, e: object) -> bool:
        return isinstance(e, Entry) and e.uri in self._count and any(e in lane for lane in self._lanes.values())

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Entry]:
        lanes = [iter(lane) for lane in self._lanes.values()]
        while lanes:
            alive = []
            for it in lanes:
                e = next(it, None)
                if e is not None:
                    yield e
                    alive.append(it)
            lanes = alive

    def __repr__(self) -> str:
        return f"DemandQueue({list(self)!r})"

    def uris(self):
        """The distinct URIs queued (a live view)."""
        return self._count.keys()


def _first_files() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        cores = os.cpu_count() or 1
    return cores + 1


# The first files of each job (of the manifest; a reader's next files, from its ahead hints, before the
# manifest lists them) are fetched early: together over every connection, and no other prefetch is
# handed out until each of their GETs has been answered (workers.py, handout.py). As many as
# TFRecordDataset(num_parallel_reads=AUTOTUNE) takes before its first record: its parallel interleave
# opens cycle_length = port::MaxParallelism() files (the cores this process may run on), and a worker
# filling its buffer of future files asks the input for one more while holding the lock the first
# record is taken under; s3cache.tf.files yields a path only once its file has landed, so that first
# record waits for cores + 1 files (measured: the 3rd path on 2 cores, the 2nd under taskset -c 0). The
# daemon runs on the job's host, so its own usable cores stand in for the job's. A job that names
# num_parallel_reads itself may want more (4 with 2 here): those come as plain prefetch.
FIRST_FILES = _first_files()


MAX_PER_CONNECTION = 1_024  # one want's worth (wire.MAX_URIS): a streaming reader waits on ~16
MAX_PER_UID = 4_096  # all connections of one uid
MAX_TOTAL = 10_000  # every reader: as many as the schedule remembers outside the manifest (MAX_EXTRA)


class _Conn(Protocol):
    uid: int


class OutsideDemand:
    def __init__(self, per_connection: int = MAX_PER_CONNECTION, per_uid: int = MAX_PER_UID,
                 total: int = MAX_TOTAL) -> None:
        self.caps = (per_connection, per_uid, total)
        self.waiting: dict[object, set[str]] = {}
        self.per_uid: dict[int, int] = {}
        self.total = 0
        self.refused = 0  # waits refused for a cap since start

    def admit(self, conn: _Conn, uri: str) -> str | None:
        """Count ``conn``'s wait on ``uri``; None if admitted (or already counted), else why not."""
        mine = self.waiting.get(conn)
        if mine is not None and uri in mine:
            return None
        uid = getattr(conn, "uid", -1)
        per_conn, per_uid, total = self.caps
        why = None
        if mine is not None and len(mine) >= per_conn:
            why = f"this connection already waits on {len(mine)} objects outside the manifest (at most {per_conn})"
        elif self.per_uid.get(uid, 0) >= per_uid:
            why = f"uid {uid} already waits on {self.per_uid[uid]} objects outside the manifest (at most {per_uid})"
        elif self.total >= total:
            why = f"readers already wait on {self.total} objects outside the manifest (at most {total})"
        if why is not None:
            self.refused += 1
            return why + ": ask again once some have come"
        self.waiting.setdefault(conn, set()).add(uri)
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        self.total += 1
        return None

    def done(self, uri: str, conns: Iterable[object]) -> None:
        """``uri`` landed or failed: its waits end."""
        for conn in conns:
            mine = self.waiting.get(conn)
            if mine is not None and uri in mine:
                self._drop(conn, mine, uri)

    def closed(self, conn: object) -> set[str]:
        """``conn`` closed: its waits end. Returns the objects it waited on."""
        mine = self.waiting.pop(conn, set())
        uid = getattr(conn, "uid", -1)
        if mine:
            left = self.per_uid[uid] - len(mine)
            if left:
                self.per_uid[uid] = left
            else:
                del self.per_uid[uid]
            self.total -= len(mine)
        return mine

    def _drop(self, conn: object, mine: set[str], uri: str) -> None:
        mine.discard(uri)
        if not mine:
            del self.waiting[conn]
        uid = getattr(conn, "uid", -1)
        left = self.per_uid[uid] - 1
        if left:
            self.per_uid[uid] = left
        else:
            del self.per_uid[uid]
        self.total -= 1
