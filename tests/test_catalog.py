"""The catalog: a share of the manifest (issue 14.1), listed sizes kept as hints (issue 17.8)."""

from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry, Listed, Prefix, expand
from s3cache.manifest.refs import ObjectRef
from s3cache.manifest.shard import Shard


def e(key, **kw):
    return Entry(ObjectRef("bkt", key), **kw)


def test_shards_partition_the_expanded_manifest():
    items = [e("a"), Prefix("bkt", "p/"), e("z", pin=True)]
    listing = [Listed(f"p/{i}", i, "") for i in range(7)]
    whole = [x.uri for x in expand(items, lambda b, p: listing)]
    assert len(whole) == 9  # the prefix line is seven positions
    shares = []
    for i in range(4):
        c = Catalog.build(expand(items, lambda b, p: listing), Shard(i, 4))
        assert c.total == 9 and c.shard == Shard(i, 4)
        got = [x.uri for x in c.entries()]
        assert got == [u for p, u in enumerate(whole) if p % 4 == i]  # the manifest's order, within the share
        assert [c.global_position(j) for j in range(len(c))] == [p for p in range(9) if p % 4 == i]
        for j, u in enumerate(got):
            assert c.position(u) == j and not c.off_share(u)
        for u in set(whole) - set(got):
            assert c.position(u) is None and c.off_share(u)
        assert not c.off_share("s3://bkt/not-in-the-manifest")
        shares.append(got)
    assert sorted(u for s in shares for u in s) == sorted(whole)
    # pin=1 on the last entry (position 8) lands in share 0 as that catalog's own position
    assert Catalog.build(expand(items, lambda b, p: listing), Shard(0, 4)).pinned == {2}


def test_a_duplicate_counts_as_a_position_and_belongs_to_every_share_that_reads_it():
    entries = [e("a"), e("b"), e("a"), e("c")]  # positions 0..3; "a" at 0 and 2
    c0 = Catalog.build(entries, Shard(0, 2))
    c1 = Catalog.build(entries, Shard(1, 2))
    assert [x.ref.key for x in c0.entries()] == ["a"]  # positions 0 and 2 are both "a": kept once
    assert [x.ref.key for x in c1.entries()] == ["b", "c"]
    assert [c1.global_position(i) for i in range(2)] == [1, 3]
    whole = Catalog.build(entries)
    assert [x.ref.key for x in whole.entries()] == ["a", "b", "c"]
    assert [whole.global_position(i) for i in range(3)] == [0, 1, 3]


def test_size_hint_survives_the_catalog():
    items = [e("given", size=5), Prefix("bkt", "p/", pin=True)]
    c = Catalog.build(expand(items, lambda b, p: [Listed("p/x", 9, ""), Listed("p/y", 1, "")]))
    got = list(c.entries())
    assert [(x.size, x.size_is_hint, x.pin) for x in got] == [(5, False, False), (9, True, True), (1, True, True)]
    assert c.pinned == {1, 2} and c.avg_size == 5


def test_duplicates_keep_the_first_occurrences_flags():
    c = Catalog.build([e("k", size=3, size_is_hint=True), e("m", size=1), e("k", size=4, pin=True)])
    assert list(c.entries()) == [e("k", size=3, size_is_hint=True), e("m", size=1)]
    assert c.pinned == frozenset() and c.avg_size == 2


def test_off_share_hashes_are_sorted_in_runs_like_sorted_would():
    import random
    from array import array

    from s3cache.manifest.catalog import _sorted

    a = array("q", (random.getrandbits(64) - (1 << 63) for _ in range(5000)))
    assert _sorted(a, chunk=300) == array("q", sorted(a))
    assert _sorted(array("q"), chunk=300) == array("q")


def test_total_size_counts_the_sizes_given_once_each():
    c = Catalog.build([e("k", size=3), e("m"), e("n", size=7), e("k", size=4)])
    assert (c.total_size, c.sized, len(c)) == (10, 2, 3)
    assert [c.has_size(i) for i in range(3)] == [True, False, True]
    assert (Catalog().total_size, Catalog().sized) == (0, 0)
