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
import itertools
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

M64 = (1 << 64) - 1
TAG = b"s3cache-order-v1"
LIST_CHUNK = 1000  # URIs per order_list message
LIST_CHUNK_BYTES = 512 << 10  # ... and at most this many bytes of them (a ctl.sock line is at most 1 MiB)
MAX_LISTS = 4  # uploaded lists a daemon keeps (least recently announced dropped first)
MAX_LIST_URIS = 4_000_000  # URIs in one uploaded list (the daemon keeps them to re-map on reload)
MAX_SHARES = 1_024  # share digests of the manifest remembered
MAX_LIST_BYTES = 512 << 20  # memory all uploaded lists (and uploads under way) may take, estimated
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

    def remapped(self, moved: Callable[[int], int | None]) -> ListMap:
        """This map onto a new manifest: ``moved(p)`` is where old position ``p`` is now (None: gone).
        The reader's list is unchanged; only where its URIs stand in the manifest moved."""
        table = []
        for j in range(self.length):
            p = self.position(j)
            q = moved(p) if p is not None else None
            table.append(-1 if q is None else q)
        return ListMap(self.length, table=table)


_perm_cache: OrderedDict[tuple[int, int, int], tuple[array, array]] = OrderedDict()
_perm_lock = threading.Lock()  # the daemon's handler threads build orders while others read them
PERM_CACHE = 16  # orders kept: this epoch's and the next one's for 8 readers


def _order(n: int, seed: int, epoch: int) -> tuple[array, array]:
    """(permutation, inverse), memoised for the few orders in use (readers sharing a seed share them)."""
    key = (n, seed & M64, epoch & M64)
    with _perm_lock:
        got = _perm_cache.get(key)  # pragma: no mutate (a memo: a miss only recomputes the same order)
        if got is not None:
            _perm_cache.move_to_end(key)
            return got
    perm = permutation(n, seed, epoch)  # outside the lock: ~1 s a million entries
    got = (perm, inverse(perm))
    with _perm_lock:
        _perm_cache[key] = got  # pragma: no mutate (as above)
        while len(_perm_cache) > PERM_CACHE:  # pragma: no mutate (which order goes changes no answer)
            _perm_cache.popitem(last=False)  # pragma: no mutate
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
        # The reader began the next epoch before announcing it: near the end of this epoch, a file near
        # the start of the next. Not a file it resolved lately: a reader that waited on a file notes it
        # twice (the want, then the use), and reading that second note as a wrap moved the epoch on once
        # per file (a 64-file dataset's reader was thought to be in epoch 45 halfway through epoch 0,
        # so eviction planned for orders nobody would read). ``near`` scales with the list, so a small
        # list's every file is not "near the start".
        near = max(1, min(JUMP, self.n // 8))
        if r < self.cursor - near and self.cursor >= self.n - near:
            r2 = self._next()[1][j]
            if r2 < near:
                self.epoch += 1
                self.cursor = r2 + 1


class ListError(ValueError):
    """An ``order`` or ``order_list`` message that cannot be taken (its text says why)."""


class Lists:
    """The lists readers announce orders over, by digest, and their maps onto the current manifest.

    A digest is known if it is the manifest's own (the catalog this daemon holds: with ``--shard`` the
    host's share), a share ``[I, K]`` of it, or a list a reader uploaded (``order_list``). Uploaded lists
    keep their URIs so they can be mapped onto a reloaded manifest; at most ``MAX_LISTS`` of them, each
    of at most ``MAX_LIST_URIS``, and all lists and uploads under way within ``MAX_LIST_BYTES`` (older
    ones are dropped first; a reader whose list was dropped is asked for it again). Invariants: a map
    is only ever returned for the manifest ``token`` it was built against; an upload becomes a list
    only once its URIs hash to its digest. Thread-safe: the
    daemon's handler threads call it outside the state lock (the work is ~1 s per million entries).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digests: dict[tuple[int, int], str] = {}  # (I, K) -> digest, for manifest ``_token``
        self._token: object = None
        self._uploaded: OrderedDict[str, list[str]] = OrderedDict()
        self._maps: dict[str, tuple[object, ListMap]] = {}  # digest -> (token, map)
        self._partial: OrderedDict[str, list[str]] = OrderedDict()  # uploads under way
        self._sizes: dict[str, int] = {}  # estimated bytes of each list, uploaded or under way

    def _make_room(self, keep: str, size: int) -> None:
        """Account ``size`` more bytes to list ``keep``, dropping the oldest other lists to fit (lock held)."""
        self._sizes[keep] = self._sizes.get(keep, 0) + size
        for table in (self._partial, self._uploaded):
            for d in [d for d in table if d != keep]:
                if sum(self._sizes.values()) <= MAX_LIST_BYTES:
                    return
                del table[d]
                self._maps.pop(d, None)
                self._sizes.pop(d, None)
        if sum(self._sizes.values()) > MAX_LIST_BYTES:
            self._partial.pop(keep, None)
            self._sizes.pop(keep, None)
            raise ListError(f"list {keep} is larger than the {MAX_LIST_BYTES >> 20} MiB the daemon keeps for lists")

    def _share_digest(self, token: object, uris: Callable[[], Iterable[str]], index: int, count: int) -> str:
        with self._lock:
            if self._token is not token:
                self._token, self._digests = token, {}
            got = self._digests.get((index, count))
        if got is None:
            got = list_digest(itertools.islice(uris(), index, None, count))
            with self._lock:
                if self._token is token:
                    if len(self._digests) >= MAX_SHARES:  # shares are whatever a reader sends: bounded
                        del self._digests[next(iter(self._digests))]
                    self._digests[(index, count)] = got
        return got

    def map_for(self, digest: str, n: int, share: tuple[int, int] | None, *, token: object, manifest_n: int,
                manifest_uris: Callable[[], Iterable[str]], position_of: Callable[[str], int | None]
                ) -> ListMap | None:
        """The map of list ``digest`` (``n`` URIs) onto the manifest ``token``, or None if unknown.

        ``manifest_uris()`` yields the manifest's URIs (identities) in order; ``position_of`` maps an
        identity to its manifest position."""
        index, count = share if share is not None else (0, 1)
        if not 0 <= index < count:
            raise ListError(f"share [{index}, {count}]: index must be in 0..count-1")
        if n == len(range(index, manifest_n, count)) and \
                self._share_digest(token, manifest_uris, index, count) == digest:
            return ListMap.share(manifest_n, index, count) if count > 1 else ListMap(manifest_n)
        with self._lock:
            uris = self._uploaded.get(digest)
            if uris is None:
                return None
            self._uploaded.move_to_end(digest)
            built = self._maps.get(digest)
        if len(uris) != n:
            raise ListError(f"list {digest} has {len(uris)} URIs, the order says {n}")
        if built is not None and built[0] is token:
            return built[1]
        lm = ListMap.from_uris(uris, position_of)  # the manifest changed since: map it again
        with self._lock:
            if digest in self._uploaded:
                self._maps[digest] = (token, lm)
        return lm

    def upload(self, digest: str, offset: int, total: int, uris: list[str]) -> int:
        """A chunk of list ``digest`` (``total`` URIs) from ``offset``; returns the URIs received so far
        (``total`` once the list is known). Chunks come in order; a chunk out of order restarts it."""
        if not 0 < total <= MAX_LIST_URIS:
            raise ListError(f"a list must have 1 to {MAX_LIST_URIS} URIs, not {total}")
        with self._lock:
            if digest in self._uploaded:
                return total
            got = self._partial.pop(digest, [])
            if offset != len(got):
                self._sizes.pop(digest, None)
                raise ListError(f"list {digest}: chunk at {offset}, expected {len(got)}; start again at 0")
            got.extend(uris)
            if len(got) > total:
                self._sizes.pop(digest, None)
                raise ListError(f"list {digest}: more than the {total} URIs announced")
            self._partial[digest] = got
            self._make_room(digest, sum(sys.getsizeof(u) + 8 for u in uris))  # + its slot in the list
            if len(got) < total:
                while len(self._partial) > MAX_LISTS:
                    self._sizes.pop(self._partial.popitem(last=False)[0], None)
                return len(got)
            del self._partial[digest]
        if list_digest(got) != digest:
            with self._lock:
                self._sizes.pop(digest, None)
            raise ListError(f"list {digest}: the URIs sent do not hash to it")
        with self._lock:
            self._uploaded[digest] = got
            while len(self._uploaded) > MAX_LISTS:
                old, _ = self._uploaded.popitem(last=False)
                self._maps.pop(old, None)
                self._sizes.pop(old, None)
        return total


def chunks(uris: Sequence[str]) -> Iterable[tuple[int, list[str]]]:
    """(offset, URIs) pieces of a list for ``order_list`` messages: at most LIST_CHUNK URIs and about
    LIST_CHUNK_BYTES of them each (a non-ASCII key takes up to 6 bytes a character in JSON)."""
    i = 0
    while i < len(uris):
        j, size = i, 0
        while j < len(uris) and j - i < LIST_CHUNK and (size < LIST_CHUNK_BYTES or j == i):
            size += 6 * len(uris[j].encode()) + 4
            j += 1
        yield i, list(uris[i:j])
        i = j
