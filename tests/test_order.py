"""Per-epoch permutations and announced orders (s3cache.order), pure."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.policy.order import (
    JUMP,
    Announcement,
    ListMap,
    inverse,
    list_digest,
    permutation,
)


def reference_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The algorithm as the module docstring specifies it, written out independently."""
    key = b"s3cache-order-v1" + (seed % 2**64).to_bytes(8, "little") + (epoch % 2**64).to_bytes(8, "little")
    stream = hashlib.shake_128(key).digest(8 * max(n - 1, 0))
    p = list(range(n))
    for step, i in enumerate(range(n - 1, 0, -1)):
        x = int.from_bytes(stream[8 * step: 8 * step + 8], "little")
        j = x * (i + 1) // 2**64
        p[i], p[j] = p[j], p[i]
    return p


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 300), st.integers(-2**70, 2**70), st.integers(0, 1000))
def test_permutation_is_the_specified_shuffle(n, seed, epoch):
    p = permutation(n, seed, epoch)
    assert sorted(p) == list(range(n))
    assert list(p) == reference_permutation(n, seed, epoch)
    rank = inverse(p)
    assert all(rank[p[k]] == k for k in range(n))


def test_permutation_is_pinned_across_versions_and_hosts():
    # Readers and daemons of different releases and hosts must agree: this vector must never change.
    assert list(permutation(10, 42, 0)) == reference_permutation(10, 42, 0)
    assert list(permutation(10, 42, 0)) == [9, 3, 0, 6, 4, 7, 8, 1, 5, 2]


def test_each_epoch_and_seed_gives_a_new_order():
    orders = {tuple(permutation(1000, s, e)) for s in range(3) for e in range(5)}
    assert len(orders) == 15


def test_list_maps_for_the_manifest_a_share_and_a_list_of_uris():
    ident = ListMap(10)
    assert [ident.position(j) for j in range(10)] == list(range(10)) and ident.index(10) is None
    share = ListMap.share(10, 1, 3)  # Dataset.shard(3, 1): entries 1, 4, 7
    assert share.length == 3 and [share.position(j) for j in range(3)] == [1, 4, 7]
    assert share.index(4) == 1 and share.index(5) is None and share.index(10) is None
    manifest = {"s3://b/a": 0, "s3://b/b": 1, "s3://b/c": 2}
    table = ListMap.from_uris(["s3://b/c", "s3://b/x", "s3://b/a"], manifest.get)
    assert [table.position(j) for j in range(3)] == [2, None, 0]
    assert table.index(0) == 2 and table.index(1) is None
    assert list_digest(["s3://b/a", "s3://b/b"]) != list_digest(["s3://b/b", "s3://b/a"])
    assert list_digest(["s3://b/a"]) == list_digest(iter(["s3://b/a"]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32), st.integers(0, 50), st.data())
def test_an_announcement_knows_each_files_next_use(n, seed, epoch, data):
    cursor = data.draw(st.integers(0, n))
    a = Announcement(seed, epoch, ListMap(n), cursor)
    this, nxt = permutation(n, seed, epoch), permutation(n, seed, epoch + 1)
    walk = list(this[cursor:]) + list(nxt)
    for k in range(2 * n - cursor):
        assert a.at(k) == walk[k]
    assert a.at(2 * n - cursor) is None
    for p in range(n):  # the distance is to the first occurrence ahead, into the next epoch
        assert a.distance(p) == walk.index(p)


def test_an_announced_reader_moves_along_its_order_and_into_the_next_epoch():
    n = 1000
    a = Announcement(7, 2, ListMap(n))
    order = permutation(n, 7, 2)
    for p in order[:10]:
        a.saw(p)
    assert a.cursor == 10
    a.saw(order[3])  # a late note: no step back
    a.saw(order[10 + JUMP])  # far ahead: a stranger, not progress
    assert a.cursor == 10
    for p in order[10:]:
        a.saw(p)
    assert a.cursor == n and a.distance(order[0]) == list(permutation(n, 7, 3)).index(order[0])
    nxt = permutation(n, 7, 3)
    a.saw(nxt[0])  # began epoch 3 before announcing it
    assert (a.epoch, a.cursor) == (3, 1)


def test_a_sharded_readers_order_maps_onto_the_manifest():
    share = ListMap.share(100, 2, 4)  # 25 entries: 2, 6, ..., 98
    a = Announcement(1, 0, share)
    perm = permutation(25, 1, 0)
    assert [a.at(k) for k in range(25)] == [2 + 4 * j for j in perm]
    assert a.distance(3) is None  # another host's file


def test_a_reader_that_notes_each_file_twice_stays_in_its_epoch():
    # A reader that waited on a file notes it twice: in its want, then as used. On a small list every
    # file is "near the start" of the next epoch; the second note once moved the epoch on each time.
    n = 64
    a = Announcement(11, 0, ListMap(n))
    order = permutation(n, 11, 0)
    for k, p in enumerate(order):
        a.saw(p)
        a.saw(p)
        assert (a.epoch, a.cursor) == (0, k + 1)
    nxt = permutation(n, 11, 1)
    for k, p in enumerate(nxt[:8]):  # then it begins epoch 1 without announcing it: found within a few files
        a.saw(p)
        if a.epoch == 1:
            break
    assert (a.epoch, a.cursor) == (1, k + 1)


# -- a reader that began the next epoch without announcing it --------------------------------------


def _wrap_case(n: int, cursor: int, want_r, want_r2):
    """A seed and a position whose rank in epoch 0 satisfies ``want_r`` and in epoch 1 ``want_r2``."""
    for seed in range(500):
        this, nxt = inverse(permutation(n, seed, 0)), inverse(permutation(n, seed, 1))
        for p in range(n):
            if want_r(this[p]) and want_r2(nxt[p]):
                return seed, p
    raise AssertionError("no such seed")


def _epoch_after(n, cursor, seed, p):
    a = Announcement(seed, 0, ListMap(n), cursor)
    a.saw(p)
    return a.epoch, a.cursor


def test_a_wrap_is_taken_only_near_the_end_of_this_epoch_and_the_start_of_the_next():
    n, near = 64, 8  # near is n // 8 for a list this size
    # at exactly n - near the reader is near the end: a file near the next epoch's start is a wrap
    seed, p = _wrap_case(n, n - near, lambda r: r < n - 2 * near, lambda r2: r2 == 0)
    assert _epoch_after(n, n - near, seed, p) == (1, 1)
    assert _epoch_after(n, n - near - 1, seed, p) == (0, n - near - 1)  # one file earlier: not yet
    # the next epoch's rank must be below near: 7 is near, 8 is not
    seed, p = _wrap_case(n, n, lambda r: r < n - near, lambda r2: r2 == near - 1)
    assert _epoch_after(n, n, seed, p) == (1, near)
    seed, p = _wrap_case(n, n, lambda r: r < n - near, lambda r2: r2 == near)
    assert _epoch_after(n, n, seed, p) == (0, n)
    # and this epoch's rank must be more than near behind the cursor
    seed, p = _wrap_case(n, n, lambda r: r == n - near, lambda r2: r2 == 0)
    assert _epoch_after(n, n, seed, p) == (0, n)
    seed, p = _wrap_case(n, n, lambda r: r == n - near - 1, lambda r2: r2 == 0)
    assert _epoch_after(n, n, seed, p) == (1, 1)


def test_near_is_an_eighth_of_a_small_list_in_whole_files_and_at_least_one():
    for n, near in [(8, 1), (12, 1), (20, 2)]:
        far = n - near - 1  # this epoch's rank well behind the cursor
        seed, p = _wrap_case(n, n, lambda r, far=far: r < far, lambda r2, near=near: r2 == near)
        assert _epoch_after(n, n, seed, p) == (0, n), n
        seed, p = _wrap_case(n, n, lambda r, far=far: r < far, lambda r2, near=near: r2 == near - 1)
        assert _epoch_after(n, n, seed, p) == (1, near), n


def test_a_list_digest_is_the_sha256_of_the_uris_each_with_a_newline_cut_to_32_hex_digits():
    want = hashlib.sha256(b"s3://b/a\ns3://b/b\n").hexdigest()[:32]
    assert list_digest(["s3://b/a", "s3://b/b"]) == want and len(want) == 32
    assert list_digest(["s3://b/é"]) == hashlib.sha256("s3://b/é\n".encode()).hexdigest()[:32]


def test_a_share_index_outside_its_count_is_refused_naming_the_range():
    import pytest

    with pytest.raises(ValueError, match=r"share index 3 is not in 0\.\.2$"):
        ListMap.share(10, 3, 3)


def test_two_entries_are_shuffled_too():
    orders = {tuple(permutation(2, seed, 0)) for seed in range(16)}
    assert orders == {(0, 1), (1, 0)}
    assert all(list(permutation(2, s, 0)) == reference_permutation(2, s, 0) for s in range(16))
    assert list(permutation(1, 5, 0)) == [0] and list(permutation(0, 5, 0)) == []
