"""The catalog's contract at its edges (issue 21, mutants mutmut found alive in catalog.py): the empty
catalog a daemon without a manifest holds, the canonical line ``s3cache manifest`` prints, many
duplicates, the mean size, and ``off_share`` for keys this host does hold."""

from s3cache.manifest.catalog import Catalog, format_entry
from s3cache.manifest.parse import Entry, parse_line
from s3cache.manifest.refs import ObjectRef
from s3cache.manifest.shard import WHOLE, Shard


def e(key, **kw):
    return Entry(ObjectRef("bkt", key), **kw)


def test_the_empty_catalog_is_an_empty_manifest():
    # The daemon holds Catalog() until (or unless) a manifest is read: it must answer like an empty one.
    for c in (Catalog(), Catalog.build([])):
        assert len(c) == 0 and list(c.entries()) == []
        assert c.total == 0 and c.shard == WHOLE
        assert c.pinned == frozenset() and c.avg_size == 0.0
        assert c.position("s3://bkt/k") is None and "s3://bkt/k" not in c
        assert not c.off_share("s3://bkt/k")


def test_the_canonical_line_quotes_what_the_grammar_needs_and_keeps_slashes():
    line = format_entry(e("dir/sub dir/a#b%c.txt", size=3, pin=True))
    assert line == "s3://bkt/dir/sub%20dir/a%23b%25c.txt size=3 pin=1"
    assert parse_line(line) == e("dir/sub dir/a#b%c.txt", size=3, pin=True)
    assert format_entry(e("plain/key")) == "s3://bkt/plain/key"


def test_many_duplicates_among_single_keys_collapse_to_each_keys_first_position():
    keys = [f"k{i:03d}" for i in range(300)]
    twice = keys[::2]  # every other key is listed again (a third time for some), the rest once
    entries = [e(k, size=i) for i, k in enumerate(keys)] + [e(k, size=999) for k in reversed(twice)] + \
        [e(k, size=998) for k in twice[::3]]
    c = Catalog.build(entries)
    assert [x.ref.key for x in c.entries()] == keys
    assert [x.size for x in c.entries()] == list(range(300))
    assert c.total == len(entries)
    for i, k in enumerate(keys):
        assert c.position(f"s3://bkt/{k}") == i
        assert c.global_position(i) == i
    assert c.position("s3://bkt/k300") is None


def test_the_mean_size_counts_zero_byte_objects_and_skips_unknown_sizes():
    c = Catalog.build([e("a", size=0), e("b", size=10), e("c"), e("d", size=2)])
    assert c.avg_size == 4.0
    assert Catalog.build([e("a"), e("b")]).avg_size == 0.0


def test_a_key_this_host_holds_is_not_off_share_even_if_another_share_lists_it_too():
    entries = [e("a"), e("a"), e("b"), e("c")]  # "a" at position 0 (share 0 of 2) and 1 (share 1)
    c = Catalog.build(entries, Shard(0, 2))
    assert [x.ref.key for x in c.entries()] == ["a", "b"]
    assert not c.off_share("s3://bkt/a") and not c.off_share("s3://bkt/b")
    assert c.off_share("s3://bkt/c")


def test_off_share_answers_for_any_key_not_listed():
    # Whatever its hash, above or below every hash of the other shares, an unlisted key is not off-share.
    c = Catalog.build([e("a"), e("b")], Shard(0, 2))
    assert c.off_share("s3://bkt/b")
    assert not any(c.off_share(f"s3://bkt/other-{i}") for i in range(300))
