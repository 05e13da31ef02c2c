"""Per-epoch permutations and announced orders (s3cache.order), pure."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings, strategies as st

from s3cache.policy.order import JUMP, Announcement, ListMap, inverse, list_digest, permutation


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
