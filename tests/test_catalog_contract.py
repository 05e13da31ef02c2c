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


def test_keys_whose_hashes_collide_are_told_apart_by_the_key(monkeypatch):
    # 64-bit hashes of real keys practically never collide, so a weaker hash makes every key of the
    # bucket collide: duplicates must still be found by key, and lookups walk the colliding run.
    from s3cache.manifest import catalog

    monkeypatch.setattr(catalog, "_key", lambda ref: hash(ref.bucket))
    c = Catalog.build([e("a"), e("b", size=1), e("a", size=9), e("c"), e("b")])
    assert [x.ref.key for x in c.entries()] == ["a", "b", "c"] and c.total == 5
    assert c.entry(0).size is None and c.entry(1).size == 1  # each key's first occurrence is kept
    assert [c.position(f"s3://bkt/{k}") for k in "abc"] == [0, 1, 2]
    assert c.position("s3://bkt/d") is None and "s3://bkt/d" not in c


def jobs_catalog(shard=WHOLE):
    from s3cache.manifest.jobs import JobStart

    return Catalog.build([JobStart("a"), *(e(f"a{i}", size=10) for i in range(4)),
                          JobStart("b"), *(e(f"b{i}", size=i) for i in range(5)), e("b5"),
                          JobStart("c"), e("c0")], shard)


def test_a_directorys_jobs_follow_one_another_and_each_states_its_bytes():
    c = jobs_catalog()
    assert [x.ref.key for x in c.entries()] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3", "b4", "b5", "c0"]
    assert c.jobs.names == ["a", "b", "c"] and c.jobs.starts == [0, 4, 10] and c.total == 11
    assert c.job_bytes == [40, 10, 0]  # b's zero-byte object and unsized b5 add nothing; c states none
    assert c.sized == 9 and c.total_size == 50
    assert Catalog.build([e("x")]).jobs is None and Catalog.build([e("x")]).job_bytes == []


def test_a_share_is_taken_within_each_job():
    c = jobs_catalog(Shard(1, 3))  # each job's own entries 1, 4, ...: as its own tf.data pipeline shards
    assert [x.ref.key for x in c.entries()] == ["a1", "b1", "b4"]
    assert [c.global_position(i) for i in range(3)] == [1, 5, 8]
    assert c.jobs.starts == [0, 1, 3] and c.job_bytes == [10, 5, 0] and c.total == 11
    assert c.off_share("s3://bkt/b2") and not c.off_share("s3://bkt/b4")


def test_a_manifest_without_prefix_lines_has_none():
    assert list(Catalog.build([e("x")]).prefixes) == [] and list(Catalog().prefixes) == []


def test_a_catalog_read_again_unchanged_is_the_same_and_any_change_is_not():
    from s3cache.manifest.jobs import JobStart

    def build(*keys, shard=WHOLE, **kw):
        return Catalog.build([k if isinstance(k, JobStart) else e(k, **kw) for k in keys], shard)

    assert build("a", "b").same(build("a", "b")) and Catalog().same(Catalog.build([]))
    assert jobs_catalog(Shard(1, 3)).same(jobs_catalog(Shard(1, 3)))
    different = [
        (build("a", "b"), build("a", "c")),  # a line
        (build("a", size=5), build("a", size=5, size_is_hint=True)),  # only a flag
        (build("a", "a", "b"), build("a", "b", "b")),  # only where the entries stand
        (build("a", "b"), build("a", "b", "b")),  # only the count of positions
        (build("a"), build("a", shard=Shard(0, 2))),  # only the share
        (build("a", "b", shard=Shard(0, 2)), build("a", "c", shard=Shard(0, 2))),  # only the others' keys
        (build(JobStart("x"), "a"), build(JobStart("y"), "a")),  # only a job's name
        (build(JobStart("x"), "a", JobStart("y"), "b"), build(JobStart("x"), "a", "b", JobStart("y"))),
    ]
    for one, other in different:
        assert not one.same(other) and not other.same(one)
    with_prefix = build("a")
    with_prefix.prefixes = (("bkt", "p/"),)
    assert not with_prefix.same(build("a")) and not build("a").same(with_prefix)


def test_moved_says_where_each_old_position_is_in_the_new_catalog():
    old = Catalog.build([e("a"), e("b"), e("c")])
    new = Catalog.build([e("c"), e("x"), e("a")])
    moved = old.moved(new)
    assert [moved(p) for p in (-1, 0, 1, 2, 3)] == [None, 2, None, 0, None]
