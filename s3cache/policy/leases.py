"""Readers' leases: which files eviction may not take because a reader may still open them.

A lease covers the gap between ``resolve()`` returning a path and the reader opening the file (an open
file stays readable after it is unlinked). It is held per reader process (the daemon names holders
``uid:pid`` from SO_PEERCRED), for each holder's newest files and older ones within its share of a
budget, and every file it resolved in the last ``recent`` seconds (its threads' files between resolve
and open), never for longer than ``--lease``: so a reader that moved on never holds the cache against
the file it waits for (issue 17 item 5), threads that finished hold nothing for long, and one uid holds
at most about ``uid_cap`` bytes however many processes (or made-up reader ids) it uses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

LEASE_SHARE = 32  # leases hold at most 1/32 of the cache (beyond each holder's newest two files)
LEASE_RECENT = 10.0  # seconds each thread's two newest files stay held (its resolve-to-open gap)
MAX_THREADS = 256  # threads of one process whose newest files are kept
LEASE_UID_SHARE = 2  # the processes of one uid hold at most about half the cache (+ one file): another uid has the rest


def lease_budget(max_size: int, filesystem: int) -> int:
    """The bytes leases may hold beyond each holder's newest files: a share of what the cache can really
    hold, the smaller of ``--max-size`` and the filesystem (``filesystem``: its size in bytes). A share
    of ``--max-size`` alone let a reader's own old files, leased on a filesystem smaller than it, keep
    that reader's next file out until ``--lease`` ended."""
    return min(max_size, filesystem) // LEASE_SHARE


class Leases:
    """Which files readers' leases hold: the newest each reader resolved, within ``lease`` seconds.

    A reader's lease covers its ``min_files`` newest files, and older ones while their bytes stay within
    its share of the budget (``budget`` bytes, split evenly between the readers active within the lease).
    Invariants: a file a reader resolved more than ``lease`` seconds ago is never held; at most
    ``budget`` bytes plus ``min_files`` files per reader are held, so a reader that moved on never holds
    more than its newest few files, and with ``budget`` below the cache a waiting reader can always be
    given room; a file among a thread's ``min_files`` newest (``reader`` named ``process|thread``;
    newest by place in the process's order, not by arrival: a file the thread took before it landed
    never pushes out files it took since) is held for ``recent`` seconds from that thread's latest note
    of it, whatever the budget (within the uid cap), so a file resolved again is held as a new one.
    ``held`` is what ``choose_victims`` takes. Times are the caller's clock: the daemon's is
    ``time.monotonic`` (a step of the wall clock never ends or stretches a lease).
    """

    def __init__(self, lease: float, budget: int, min_files: int = 2, uid_cap: int | None = None,
                 recent: float = 0.0, uncapped: Iterable[str] = ()) -> None:
        self.lease = lease
        # A holder is a process ("uid:pid|thread" names one of its threads): each thread's two newest
        # files resolved within ``recent`` seconds are held too, whatever the budget, as each thread
        # opens its own soon; a thread that finished frees them after ``recent``, not ``lease``.
        self.recent = min(recent, lease)
        # process -> thread -> its newest files as (uri, size, when, place), by place
        self._threads: dict[str, OrderedDict[str, list[tuple[str, int, float, int]]]] = {}
        self.budget = budget
        self.min_files = min_files
        # Holders named "uid:pid" (the daemon's) of one uid hold at most about this many bytes in all,
        # however many processes it runs: newest files first, each process's in turn (a file several of
        # them hold counts once); the file that
        # crosses the cap is still held, and a uid always holds ``min_files`` (a lone reader of a small
        # cache keeps its two newest files, as before the cap).
        self.uid_cap = uid_cap
        self.uncapped = frozenset(uncapped)  # uids trusted like pins (root, the daemon's): no cap
        # reader -> uri -> (size, when its lease started, its place in the reader's order), oldest first;
        # and the bytes in it
        self._recent: dict[str, OrderedDict[str, tuple[int, float, int]]] = {}
        self._bytes: dict[str, int] = {}
        self._tickets = 0
        self.changes = 0  # counts every change to what is leased: whether to save them again

    def ticket(self) -> int:
        """A place in readers' order: later than every place handed out before. Times do not serve:
        the notes of one batch share a timestamp, and a tie put a file that landed later after files
        its reader took after it, pushing those out of the lease (the lease race of issue 11)."""
        self._tickets += 1
        return self._tickets

    def saw(self, reader: str, uri: str, size: int, now: float, place: int | None = None) -> None:
        """``reader`` may open ``uri`` from ``now`` on. ``place``: the ``ticket`` taken when the reader
        took it, if it was not ready then (it used the file between its rename and its commit, and may
        have moved on to newer files since): it goes in the reader's order there, so it does not push
        those out of the lease. Without one it is the reader's newest. ``reader`` may be
        ``process|thread``: the lease is the process's, and the thread's newest files are kept fresh."""
        reader, _, thread = reader.partition("|")
        if place is None:
            place = self.ticket()
        if thread and self.recent > 0:
            self._thread_saw(reader, thread, uri, size, now, place)
        q = self._recent.setdefault(reader, OrderedDict())
        total = self._bytes.get(reader, 0)
        old = q.pop(uri, None)
        if old is not None:
            total -= old[0]
        if q and place < next(reversed(q.values()))[2]:
            q[uri] = (size, now, place)
            q = self._recent[reader] = OrderedDict(sorted(q.items(), key=lambda kv: kv[1][2]))
        else:
            q[uri] = (size, now, place)
        total += size
        self.changes += 1
        while len(q) > self.min_files:  # keep what could be held, with the budget all this reader's
            oldest = next(iter(q.values()))
            if total - oldest[0] < self.budget and now - oldest[1] < self.lease:
                break
            total -= q.popitem(last=False)[1][0]
        self._bytes[reader] = total

    def _thread_saw(self, reader: str, thread: str, uri: str, size: int, now: float, place: int) -> None:
        """``thread`` of process ``reader`` took ``uri`` at ``place`` in the process's order: keep the
        thread's ``min_files`` files of the latest places, each with the time of its latest note.

        By place, not by arrival: a file the thread took before it landed (``place`` from its ticket)
        arrives after files the thread took since, and appended as the newest it pushed out the file the
        thread had just been handed. A file the thread already holds is renewed, not skipped: resolved
        again, it is opened soon again, so its hold counts from now (kept at its first note, it ran out
        ``recent`` after that one while the thread still used it)."""
        threads = self._threads.setdefault(reader, OrderedDict())
        mine = threads.pop(thread, None) or []
        threads[thread] = mine  # the most recently active thread last
        for i, (u, _, when, at) in enumerate(mine):
            if u == uri:
                del mine[i]
                now, place = max(now, when), max(place, at)
                break
        mine.append((uri, size, now, place))
        mine.sort(key=lambda e: e[3])
        del mine[: max(0, len(mine) - self.min_files)]
        while len(threads) > MAX_THREADS:  # thread names are the reader's to choose: bounded
            threads.popitem(last=False)

    def held(self, now: float) -> set[str]:
        active = {r: q for r, q in self._recent.items() if q and now - max(v[1] for v in q.values()) < self.lease}
        for r in [r for r in self._recent if r not in active]:
            self.forget(r)
        share = self.budget // max(1, len(active))
        by_uid: dict[str, list[list[tuple[str, int]]]] = {}
        for holder, q in active.items():
            bytes_ = 0
            i = 0
            mine: list[tuple[str, int]] = []
            for uri, (size, when, _) in reversed(q.items()):
                if now - when >= self.lease:
                    continue
                bytes_ += size
                if i >= self.min_files and bytes_ > share:
                    break
                mine.append((uri, size))
                i += 1
            seen = {u for u, _ in mine}
            for files in self._threads.get(holder, {}).values():
                for uri, size, when, _ in files:
                    if now - when < self.recent and uri not in seen:
                        mine.append((uri, size))
                        seen.add(uri)
            by_uid.setdefault(holder.split(":", 1)[0] if ":" in holder else holder, []).append(mine)
        out: set[str] = set()
        for uid, lists in by_uid.items():
            if self.uid_cap is None or uid in self.uncapped:
                for mine in lists:
                    out.update(u for u, _ in mine)
                continue
            held = files = 0
            counted: set[str] = set()  # a file two processes of the uid hold takes its bytes once
            for rank in range(max(len(m) for m in lists)):  # each process's newest, then the next ones
                for mine in lists:
                    if rank >= len(mine) or mine[rank][0] in counted:
                        continue
                    if held < self.uid_cap or files < self.min_files:
                        out.add(mine[rank][0])
                        counted.add(mine[rank][0])
                        held += mine[rank][1]
                        files += 1
        return out

    def holders(self, now: float) -> int:
        """Readers whose lease holds a file now."""
        return sum(1 for q in self._recent.values() if q and now - max(v[1] for v in q.values()) < self.lease)

    def snapshot(self, now: float) -> list[list]:
        """The leases in force, as rows ``[reader, uri, size, when, place]`` for ``restore``."""
        return [[reader, uri, size, when, place] for reader, q in self._recent.items()
                for uri, (size, when, place) in q.items() if now - when < self.lease]

    def restore(self, rows: object, now: float) -> int:
        """Leases a previous run granted (``snapshot``'s rows, times on this same clock), before any
        ``saw``: each keeps what is left of its ``lease``. Rows that expired, lie in the future (another
        clock) or are malformed are dropped. Returns how many were restored."""
        good = []
        for row in rows if isinstance(rows, list) else []:
            if not (isinstance(row, list) and len(row) == 5):
                continue
            reader, uri, size, when, place = row
            if (isinstance(reader, str) and isinstance(uri, str) and type(size) is int and size >= 0
                    and isinstance(when, (int, float)) and type(place) is int and 0 <= now - when < self.lease):
                good.append((place, reader, uri, size, float(when)))
        for place, reader, uri, size, when in sorted(good):
            q = self._recent.setdefault(reader, OrderedDict())
            old = q.pop(uri, None)
            q[uri] = (size, when, place)
            self._bytes[reader] = self._bytes.get(reader, 0) + size - (old[0] if old else 0)
            self._tickets = max(self._tickets, place)
        return len(good)

    def forget(self, reader: str | None = None) -> None:
        self.changes += 1
        if reader is None:
            self._recent.clear()
            self._bytes.clear()
            self._threads.clear()
        else:
            self._recent.pop(reader, None)
            self._threads.pop(reader, None)
            self._bytes.pop(reader, None)
