"""The demand queue: objects readers wait on or will soon want, served before prefetch (see schedule.py)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from s3cache.manifest.parse import Entry


class DemandQueue(deque):
    """The demand queue: a deque of entries with the count of each URI beside it, so "is it queued?"
    costs a dict lookup, not a scan (60,000 hints once took minutes under the state lock).

    Invariant: ``_count[uri]`` is the number of entries of ``uri`` in the deque (absent when 0); every
    mutator the schedule uses (append, appendleft, extend, popleft, pop, clear) keeps it."""

    def __init__(self, items: Iterable[Entry] = ()) -> None:
        super().__init__()
        self._count: dict[str, int] = {}
        self.extend(items)

    def _inc(self, e: Entry) -> None:
        self._count[e.uri] = self._count.get(e.uri, 0) + 1

    def _dec(self, e: Entry) -> None:
        n = self._count[e.uri] - 1
        if n:
            self._count[e.uri] = n
        else:
            del self._count[e.uri]

    def append(self, e: Entry) -> None:
        super().append(e)
        self._inc(e)

    def appendleft(self, e: Entry) -> None:
        super().appendleft(e)
        self._inc(e)

    def extend(self, items: Iterable[Entry]) -> None:
        for e in items:
            self.append(e)

    def extendleft(self, items: Iterable[Entry]) -> None:
        for e in items:
            self.appendleft(e)

    def popleft(self) -> Entry:
        e = super().popleft()
        self._dec(e)
        return e

    def pop(self) -> Entry:
        e = super().pop()
        self._dec(e)
        return e

    def clear(self) -> None:
        super().clear()
        self._count.clear()

    def remove(self, e: Entry) -> None:
        super().remove(e)
        self._dec(e)

    def drop(self, uris: set[str]) -> int:
        """Remove every entry of these URIs (one pass, whatever their number); how many were removed."""
        if not any(u in self._count for u in uris):
            return 0
        keep = [e for e in self if e.uri not in uris]
        removed = len(self) - len(keep)
        self.clear()
        self.extend(keep)
        return removed

    def has(self, uri: str) -> bool:
        return uri in self._count

    def __contains__(self, e: object) -> bool:
        return isinstance(e, Entry) and e.uri in self._count and super().__contains__(e)

    def uris(self):
        """The distinct URIs queued (a live view)."""
        return self._count.keys()
