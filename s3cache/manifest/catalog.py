"""The manifest held in memory compactly enough for ImageNet-sized lists (1.2 million entries).

Python objects per entry (a tuple, two strings, an int, a dict slot) cost ~500 bytes each; this keeps one
canonical manifest line per entry in a single buffer, and an index of 64-bit hashes sorted for binary
search: about 100 bytes per entry. An entry is parsed back (a few microseconds) when it is needed.
Duplicates collapse to their first occurrence, compared by key, not by hash.

With a shard (``--shard I/N``) the catalog holds only this host's share: the entries at expanded
positions ``p % N == I`` (see shard.py), with their lines, and of every other entry just a 64-bit hash,
so that a demand for another host's object can be told apart from one for an object not in the manifest.
"""

from __future__ import annotations

import heapq
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from urllib.parse import quote

from .jobs import Jobs, JobStart
from .parse import Entry, parse_line
from .refs import INVISIBLE, ObjectRef
from .shard import WHOLE, Shard

_NEEDS_QUOTING = re.compile(f"[%#\\s\x00-\x1f{INVISIBLE}]")  # as refs.encode_key


def format_entry(e: Entry) -> str:
    """The canonical manifest line for an entry: parse_line(format_entry(e)) == e, except for
    ``size_is_hint``, which no manifest line can say (the catalog keeps it beside the line)."""
    key = e.ref.key
    if _NEEDS_QUOTING.search(key):  # most keys need no quoting, and quote() is the slow part
        key = quote(key, safe="/")
    parts = [f"s3://{e.ref.bucket}/{key}"]
    if e.size is not None:
        parts.append(f"size={e.size}")
    for name in ("sha256", "md5", "crc32c", "crc64nvme", "crc32"):
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


def _sorted(a: array, chunk: int = 1 << 16) -> array:
    """``a`` sorted, without the million-int list ``sorted(a)`` would build at once (40 bytes an
    element): a sharded catalog would otherwise peak at several times what it keeps."""
    if len(a) <= chunk:
        return array(a.typecode, sorted(a))
    runs = [array(a.typecode, sorted(a[i : i + chunk])) for i in range(0, len(a), chunk)]
    return array(a.typecode, heapq.merge(*runs))


_HINT = 1  # flag bits: the entry's size came from a listing,
_PIN = 2  # ... the entry says pin=1
_SIZED = 4  # ... the entry gives a size (the manifest's or a listing's)


class Catalog:
    """The manifest's entries (this host's share of them), in manifest order.

    Invariants: entry ``i`` (0 <= i < len) is the line ``_data[_offsets[i]:_offsets[i+1]-1]`` with the
    flags ``_flags[i]``; ``_global[i]`` is its position in the whole expanded manifest, strictly
    increasing in ``i`` and owned by ``shard``; ``_hashes`` is sorted and ``_positions[j]`` is the entry
    whose key hashes to ``_hashes[j]``; no two entries share a key; ``_others`` is the sorted hashes of
    the keys at positions outside the share; ``total`` counts every expanded position, all shares.
    Positions (``position``, ``entry``, ``pinned``) are indexes into this catalog, in the order this
    host's readers read (tf.data's shard keeps the manifest's order within a share).
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._offsets = array("Q", [0])
        self._flags = bytearray()
        self._global = array("Q")
        self._hashes = array("q")
        self._positions = array("Q")
        self._others = array("q")
        self.shard: Shard = WHOLE
        self.total = 0  # expanded entries in the whole manifest, every share, duplicates included
        self.pinned: frozenset[int] = frozenset()  # positions of pin=1 entries
        self.avg_size = 0.0  # mean of the sizes the manifest gives (0 if none)
        self.total_size = 0  # bytes of the entries that give a size
        self.sized = 0  # entries that give a size
        self.prefixes: tuple[tuple[str, str], ...] = ()  # the manifest's prefix/ lines: (bucket, key prefix)
        self._job_names: list[str] = []  # a manifest directory's jobs (JobStart), in order
        self._job_starts = array("Q")  # ... the expanded position where each one's entries start
        self._jobs: Jobs | None = None
        self.job_bytes: list[int] = []  # bytes each job's entries give (the sizes they state)
        # Lookups repeat for the same few thousand files (in flight, resident): remember their answers.
        self._memo: dict[str, int | None] = {}

    @classmethod
    def build(cls, entries: Iterable[Entry | JobStart], shard: Shard = WHOLE) -> Catalog:
        """The catalog of ``shard``'s share of ``entries`` (the expanded manifest, in order). A manifest
        directory's stream marks where each job's entries begin (``JobStart``); the share is then
        taken within each job, as each job's own tf.data pipeline shards its own file list."""
        c = cls()
        c.shard = shard
        hashes = array("q")
        others = array("q")
        sizes = array("q")  # -1: no size given
        total = 0
        base = 0  # where the current job's positions start
        for e in entries:
            if isinstance(e, JobStart):
                c._job_names.append(e.name)
                c._job_starts.append(total)
                base = total
                continue
            total += 1
            if not shard.owns(total - 1 - base):
                others.append(_key(e.ref))
                continue
            c._data += format_entry(e).encode() + b"\n"
            c._offsets.append(len(c._data))
            c._flags.append((_HINT if e.size_is_hint else 0) | (_PIN if e.pin else 0)
                            | (_SIZED if e.size is not None else 0))
            c._global.append(total - 1)
            hashes.append(_key(e.ref))
            sizes.append(-1 if e.size is None else e.size)
        c.total = total
        order = sorted(range(len(hashes)), key=hashes.__getitem__)
        dups = c._duplicates(order, hashes)
        if dups:
            c._drop(dups)
            hashes = array("q", (h for i, h in enumerate(hashes) if i not in dups))
            sizes = array("q", (n for i, n in enumerate(sizes) if i not in dups))
            order = sorted(range(len(hashes)), key=hashes.__getitem__)
        c._hashes = array("q", (hashes[i] for i in order))
        c._positions = array("Q", order)
        del order, hashes
        c._others = _sorted(others)
        c.pinned = frozenset(i for i, f in enumerate(c._flags) if f & _PIN)
        c.sized = sum(1 for n in sizes if n >= 0)
        c.total_size = sum(n for n in sizes if n >= 0)
        c.avg_size = c.total_size / c.sized if c.sized else 0.0
        if c._job_names:
            jobs = c.jobs
            assert jobs is not None
            c.job_bytes = [sum(n for n in sizes[a:b] if n >= 0) for a, b in zip(jobs.starts, jobs.ends)]
        return c

    def _drop(self, dups: set[int]) -> None:
        """Remove the entries at ``dups`` (later occurrences of a key), keeping the rest in order."""
        data, offsets, flags, glob = bytearray(), array("Q", [0]), bytearray(), array("Q")
        for i in range(len(self)):
            if i in dups:
                continue
            data += self._data[self._offsets[i] : self._offsets[i + 1]]
            offsets.append(len(data))
            flags.append(self._flags[i])
            glob.append(self._global[i])
        self._data, self._offsets, self._flags, self._global = data, offsets, flags, glob

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

    def same(self, other: Catalog) -> bool:
        """Whether ``other`` says exactly what this one says: the same entries (lines and flags) at the
        same positions, of the same share, jobs and prefix lines. A manifest read again unchanged (a
        ConfigMap resync, another job's file touched) is the same: installing it would change nothing."""
        return (self._data == other._data and self._flags == other._flags and self._global == other._global
                and self.shard == other.shard and self.total == other.total and self._others == other._others
                and self._job_names == other._job_names and self._job_starts == other._job_starts
                and self.prefixes == other.prefixes)

    def moved(self, new: Catalog) -> Callable[[int], int | None]:
        """Where a position of this catalog is in ``new`` (None: the object is not in it). Looked up per
        position asked: readers hold a few positions, or the lists they announced, not the manifest."""
        n = len(self)
        return lambda p: new.position(self.entry(p).uri) if 0 <= p < n else None

    def line(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1] - 1].decode()

    def entry(self, i: int) -> Entry:
        item = parse_line(self.line(i))
        assert isinstance(item, Entry)
        if self._flags[i] & _HINT:
            item = item._replace(size_is_hint=True)
        return item

    def has_size(self, i: int) -> bool:
        """Whether entry ``i`` gives its size (without parsing its line)."""
        return bool(self._flags[i] & _SIZED)

    def global_position(self, i: int) -> int:
        """Entry ``i``'s position in the whole expanded manifest (the one tf.data's shard counts; for a
        manifest directory, in all its jobs' lists one after another: each job shards its own)."""
        return self._global[i]

    def entries(self):
        for i in range(len(self)):
            yield self.entry(i)

    @property
    def jobs(self) -> Jobs | None:
        """A manifest directory's jobs as ranges of positions (None for a single manifest)."""
        if self._jobs is None and self._job_names:
            starts = [bisect_left(self._global, g) for g in self._job_starts]
            self._jobs = Jobs(self._job_names, starts, len(self))
        return self._jobs

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

    def off_share(self, uri: str) -> bool:
        """Whether ``uri`` is in the manifest but in another host's share (not in this catalog).

        Judged by the 64-bit hash of the key alone (the other shares' lines are not kept): a key not in
        the manifest is taken for an off-share one with odds of about one in 2**64 / (manifest size).
        Fit for reporting, never for deciding what bytes to serve.
        """
        if not self._others or self.position(uri) is not None:
            return False
        h = _key(ref_of(uri))
        j = bisect_left(self._others, h)
        return j < len(self._others) and self._others[j] == h
