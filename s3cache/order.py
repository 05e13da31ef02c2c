"""Deterministic per-epoch file orders, and what a reader announces about its order. Pure: no I/O.

A shuffled reader's order is a pure function of (seed, epoch, n), so a reader can tell the daemon its
whole order in a few numbers and the daemon can plan for it (``evict.Future``).

The permutation: Fisher-Yates over ``range(n)``, drawing from SHAKE-128 (FIPS 202, in ``hashlib``) keyed
by ``b"s3cache-order-v1"``, the seed and the epoch (each as 8 little-endian bytes, modulo 2**64). Step
``i`` (from ``n - 1`` down to 1) takes the next 8 bytes as a little-endian integer ``x`` and swaps ``i``
with ``j = (x * (i + 1)) >> 64`` (Lemire's multiply-shift; bias below ``n / 2**64``). It depends on no
Python version, hash seed or platform, and needs no numpy. About 1 s for a million entries.

Wire shape of an announcement (``{"op": "order", ...}`` on ``ctl.sock``; see ``Announcement``)::

    {"op": "order", "reader": "host:pid", "seed": S, "epoch": E, "n": N, "start": 0,
     "list": "<digest of the reader's URI list>", "share": [I, K]}      # share optional

The reader's list ``L`` (``N`` URIs) is read in the order ``L[permutation(N, S, E)[k]]`` for k = 0, 1,
...; then epoch E + 1 follows, which the daemon derives itself. ``start`` is the index in the order the
reader starts from (resuming mid-epoch). The daemon maps list indices to manifest positions
(``ListMap``) by the digest: it is the manifest's own list (identity), or with ``share`` = [I, K] the
manifest's entries I, I + K, I + 2K, ... (``Dataset.shard(K, I)``, ``--shard``). Any other list is
registered once per daemon: ``{"op": "order_list", "list": D, "offset": o, "uris": [...]}`` in chunks
of at most ``LIST_CHUNK`` URIs, after the daemon answered an order with ``{"error": "UnknownList"}``;
the daemon maps those URIs to manifest positions itself (the reader does not know them, and they move
when the manifest is reloaded), so no message ever carries positions and URIs cross once per list.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

M64 = (1 << 64) - 1
TAG = b"s3cache-order-v1"
LIST_CHUNK = 1000  # URIs per order_list message
JUMP = 256  # a note further ahead in the order than this is a straggler or a stranger, not progress


def permutation(n: int, seed: int, epoch: int) -> array:
    """The order of epoch ``epoch`` over ``range(n)``: an array of n distinct ints (see module doc)."""
    p = array("q", range(n))
    if n < 2:
        return p
    stream = hashlib.shake_128(TAG + (seed & M64).to_bytes(8, "little") + (epoch & M64).to_bytes(8, "little"))
    draws = array("Q")
    draws.frombytes(stream.digest(8 * (n - 1)))
    if sys.byteorder == "big":
        draws.byteswap()
    for i in range(n - 1, 0, -1):
        j = (draws[n - 1 - i] * (i + 1)) >> 64
        p[i], p[j] = p[j], p[i]
    return p


def inverse(perm: Sequence[int]) -> array:
    """``rank`` with ``rank[perm[k]] == k``."""
    rank = array("q", bytes(8 * len(perm)))
    for k, x in enumerate(perm):
        rank[x] = k
    return rank


def list_digest(uris: Iterable[str]) -> str:
    """How a reader names its URI list in an announcement: SHA-256 of the URIs, each followed by \\n."""
    h = hashlib.sha256()
    for u in uris:
        h.update(u.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


class ListMap:
    """Maps indices of a reader's list to manifest positions and back.

    Invariant: ``position(index(p)) == p`` for every manifest position p on the list; an index whose URI
    is not in the manifest maps to None. Either affine (``start + j * step``: the manifest or a share of
    it, no table) or a table built from the reader's URIs.
    """

    def __init__(self, length: int, start: int = 0, step: int = 1, table: Sequence[int] | None = None) -> None:
        self.length = length
        self.start = start
        self.step = step
        self._table = None if table is None else array("q", table)
        self._back: dict[int, int] | None = None
        if self._table is not None:
            self._back = {p: j for j, p in enumerate(self._table) if p >= 0}

    @classmethod
    def share(cls, manifest_n: int, index: int, count: int) -> ListMap:
        """Manifest entries index, index + count, ... (``Dataset.shard(count, index)``)."""
        if not 0 <= index < count:
            raise ValueError(f"share index {index} is not in 0..{count - 1}")
        return cls(len(range(index, manifest_n, count)), index, count)

    @classmethod
    def from_uris(cls, uris: Sequence[str], position_of) -> ListMap:
        """A table from the reader's URIs; ``position_of(uri)`` is the manifest position or None."""
        return cls(len(uris), table=[-1 if (p := position_of(u)) is None else p for u in uris])

    def position(self, j: int) -> int | None:
        if self._table is not None:
            p = self._table[j]
            return None if p < 0 else p
        return self.start + j * self.step

    def index(self, position: int) -> int | None:
        if self._back is not None:
            return self._back.get(position)
        j, r = divmod(position - self.start, self.step)
        return j if r == 0 and 0 <= j < self.length else None


_perm_cache: dict[tuple[int, int, int], tuple[array, array]] = {}


def _order(n: int, seed: int, epoch: int) -> tuple[array, array]:
    """(permutation, inverse), memoised for the few orders in use (readers sharing a seed share them)."""
    key = (n, seed, epoch)
    got = _perm_cache.get(key)
    if got is None:
        if len(_perm_cache) >= 8:
            _perm_cache.pop(next(iter(_perm_cache)))
        perm = permutation(n, seed, epoch)
        got = _perm_cache[key] = (perm, inverse(perm))
    return got


@dataclass
class Announcement:
    """What one reader said about its order, and how far along it it is.

    Invariant: ``0 <= cursor <= n``; ``cursor`` is the index in epoch ``epoch``'s order of the next file
    the reader will resolve; after epoch ``epoch`` comes ``epoch + 1`` (derived, never announced).
    """

    seed: int
    epoch: int
    lists: ListMap
    cursor: int = 0

    @property
    def n(self) -> int:
        return self.lists.length

    def _this(self) -> tuple[array, array]:
        return _order(self.n, self.seed, self.epoch)

    def _next(self) -> tuple[array, array]:
        return _order(self.n, self.seed, self.epoch + 1)

    def distance(self, position: int) -> int | None:
        """Files this reader resolves before ``position`` (0: next); None if it is not on its list."""
        j = self.lists.index(position)
        if j is None:
            return None
        r = self._this()[1][j]
        if r >= self.cursor:
            return r - self.cursor
        return self.n - self.cursor + self._next()[1][j]

    def at(self, k: int) -> int | None:
        """Manifest position of the file ``k`` files ahead (into the next epoch), None past it or off
        the manifest."""
        i = self.cursor + k
        if i < self.n:
            j = self._this()[0][i]
        elif i < 2 * self.n:
            j = self._next()[0][i - self.n]
        else:
            return None
        return self.lists.position(j)

    def saw(self, position: int) -> None:
        """The reader resolved ``position``: move the cursor past it if it is the reader's progress."""
        j = self.lists.index(position)
        if j is None:
            return
        r = self._this()[1][j]
        if self.cursor <= r < self.cursor + JUMP:
            self.cursor = r + 1
            return
        if r < self.cursor and self.cursor >= self.n - JUMP:
            r2 = self._next()[1][j]
            if r2 < JUMP:  # the reader began the next epoch before announcing it
                self.epoch += 1
                self.cursor = r2 + 1
