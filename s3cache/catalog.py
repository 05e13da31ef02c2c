"""The manifest held in memory compactly enough for ImageNet-sized lists (1.2 million entries).

Python objects per entry (a tuple, two strings, an int, a dict slot) cost ~500 bytes each; this keeps one
canonical manifest line per entry in a single buffer, and an index of 64-bit hashes sorted for binary
search: about 100 bytes per entry. An entry is parsed back (a few microseconds) when it is needed.
Duplicates collapse to their first occurrence, compared by key, not by hash.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from urllib.parse import quote

from .manifest import Entry, parse_line
from .refs import ObjectRef


_NEEDS_QUOTING = re.compile(r"[%#\s\x00-\x1f\x7f]")


def format_entry(e: Entry) -> str:
    """The canonical manifest line for an entry (parse_line(format_entry(e)) == e)."""
    key = e.ref.key
    if _NEEDS_QUOTING.search(key):  # most keys need no quoting, and quote() is the slow part
        key = quote(key, safe="/")
    parts = [f"s3://{e.ref.bucket}/{key}"]
    if e.size is not None:
        parts.append(f"size={e.size}")
    for name in ("sha256", "md5", "crc32c"):
        v = getattr(e, name)
        if v:
            parts.append(f"{name}={v}")
    if e.version:
        parts.append(f"version={e.version}")
    if e.pin:
        parts.append("pin=1")
    return " ".join(parts)


MEMO_SIZE = 200_000


def _key(ref: ObjectRef) -> int:
    return hash((ref.bucket, ref.key))


def ref_of(uri: str) -> ObjectRef:
    bucket, _, key = uri[5:].partition("/")
    return ObjectRef(bucket, key)


class Catalog:
    def __init__(self) -> None:
        self._data = bytearray()
        self._offsets = array("Q", [0])
        self._hashes = array("q")
        self._positions = array("Q")
        self.pinned: frozenset[int] = frozenset()  # positions of pin=1 entries
        self.avg_size = 0.0  # mean of the sizes the manifest gives (0 if none)
        # Lookups repeat for the same few thousand files (in flight, resident): remember their answers.
        self._memo: dict[str, int | None] = {}

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> Catalog:
        c = cls()
        hashes = array("q")
        pinned = []
        total = known = 0
        for e in entries:
            c._data += format_entry(e).encode() + b"\n"
            c._offsets.append(len(c._data))
            hashes.append(_key(e.ref))
            if e.pin:
                pinned.append(len(hashes) - 1)
            if e.size is not None:
                total += e.size
                known += 1
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        dups = c._duplicates(order, hashes)
        if dups:
            return cls.build(e for i, e in enumerate(c.entries()) if i not in dups)
        c._hashes = array("q", (hashes[i] for i in order))
        c._positions = array("Q", order)
        c.pinned = frozenset(pinned)
        c.avg_size = total / known if known else 0.0
        return c

    def _duplicates(self, order: list[int], hashes: array) -> set[int]:
        dups: set[int] = set()
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and hashes[order[j]] == hashes[order[i]]:
                j += 1
            if j - i > 1:  # equal hashes: compare the keys themselves, keep each key's first position
                first: dict[ObjectRef, int] = {}
                for p in sorted(order[i:j]):
                    ref = self.entry(p).ref
                    if ref in first:
                        dups.add(p)
                    else:
                        first[ref] = p
            i = j
        return dups

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def line(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1] - 1].decode()

    def entry(self, i: int) -> Entry:
        item = parse_line(self.line(i))
        assert isinstance(item, Entry)
        return item

    def entries(self):
        for i in range(len(self)):
            yield self.entry(i)

    def position(self, uri: str) -> int | None:
        """Where ``s3://bucket/key`` stands in the manifest, or None if it is not listed."""
        try:
            return self._memo[uri]
        except KeyError:
            pass
        if len(self._memo) > MEMO_SIZE:
            self._memo.clear()
        pos = self._memo[uri] = self._lookup(uri)
        return pos

    def _lookup(self, uri: str) -> int | None:
        ref = ref_of(uri)
        h = _key(ref)
        j = bisect_left(self._hashes, h)
        while j < len(self._hashes) and self._hashes[j] == h:
            p = self._positions[j]
            if self.entry(p).ref == ref:
                return p
            j += 1
        return None

    def __contains__(self, uri: str) -> bool:
        return self.position(uri) is not None
