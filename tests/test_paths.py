import os
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.errors import UnsafeKey
from s3cache.manifest.refs import ObjectRef, parse_uri
from s3cache.store import paths
from s3cache.store.files import Store

keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               min_size=1, max_size=300)
segmenty = st.lists(st.sampled_from(["a", "b", "..", ".", "", "x.tfrecord", "\\", "c\x01", "é"]),
                    min_size=1, max_size=6).map("/".join).filter(bool)


def within(root, rel):
    full = os.path.normpath(os.path.join(root, rel))
    return full.startswith(root + os.sep)


@settings(max_examples=500, deadline=None)
@given(st.one_of(keys, segmenty))
def test_every_candidate_stays_inside_the_cache_dir(key):
    ref = ObjectRef("bucket", key)
    for rel in paths.candidates(ref):
        assert within("/cache", rel)
        assert not rel.startswith(paths.PRIVATE_DIR)
        assert all(len(seg.encode()) <= 255 for seg in rel.split("/"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(keys, segmenty), min_size=2, max_size=8, unique=True))
def test_distinct_keys_never_share_a_path(ks):
    primary = {}
    for k in ks:
        rel = paths.candidates(ObjectRef("bucket", k))[0]
        assert rel not in primary, (k, primary.get(rel))
        primary[rel] = k
    hashed = {paths.hashed_path(ObjectRef("bucket", k)) for k in ks}
    assert len(hashed) == len(ks)
    # readable and hashed forms live in disjoint namespaces, so a fallback never meets a readable path
    readable = {paths.readable_path(ObjectRef("bucket", k)) for k in ks} - {None}
    assert readable.isdisjoint(hashed)


def test_readable_form_keeps_key_basename_and_extension():
    assert paths.candidates(ObjectRef("b", "train/shard-00001.tfrecord"))[0] == "b/train/shard-00001.tfrecord"
    h = paths.hashed_path(ObjectRef("b", "../../etc/passwd"))
    assert h.startswith(".h/") and h.endswith("/passwd")
    assert paths.hashed_path(ObjectRef("b", "x/" + "y" * 400 + ".jpg")).endswith(".jpg")


@pytest.mark.parametrize("key", ["../../etc/passwd", "/abs/path", "a/./b", "a//b", "a\\..\\b", "tab\there",
                                 "dir/", "x" * 300, "a/" + "b" * 256])
def test_unsafe_keys_get_the_hashed_form(key):
    assert paths.readable_path(ObjectRef("b", key)) is None


@pytest.mark.parametrize("uri", ["s3://", "s3://bucket", "s3://bucket/", "http://b/k", "s3://.b/k",
                                 "s3://b/" + "k" * 1100])
def test_bad_uris_are_typed_errors(uri):
    with pytest.raises(UnsafeKey):
        parse_uri(uri)


HOSTILE = [
    "../../etc/passwd", "../escape", "/etc/shadow", "a/../../b", "..", ".", "a/b/../../../c",
    "back\\slash\\..\\..\\x", "ctrl\x01\x7f", "new\nline", "x" * 1000, ("seg" * 90 + "/") * 3 + "f",
    unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"),
    "a", "a/b", "a/b/c", "dir/", "dir//x", " leading space", "trailing.",
]


def test_hostile_keys_land_inside_the_cache_dir_and_stay_distinct(tmp_path):
    root = tmp_path / "cache"
    store = Store(str(root))
    store.open()
    try:
        placed = {}
        for i, key in enumerate(HOSTILE):
            ref = ObjectRef("bucket", key)
            fd, tmp = store.new_temp("t")
            os.write(fd, f"{i}".encode())
            os.close(fd)
            rel = store.prepare(ref)
            store.publish([(tmp, rel)])
            assert rel not in placed.values()
            placed[key] = rel
        real_root = os.path.realpath(root)
        for key, rel in placed.items():
            full = os.path.realpath(root / rel)
            assert full.startswith(real_root + os.sep)
            assert (root / rel).read_text() == str(HOSTILE.index(key))
        # "a" landed as a file first, so "a/b" could not use a/ as a directory: it took the hashed form
        assert placed["a"] == "bucket/a" and placed["a/b"].startswith(".h/")
        # nothing was written anywhere but the bucket dir, the hashed dir and the private dir
        assert sorted(os.listdir(root)) == [".h", ".s3cache", "bucket"]
        assert not (tmp_path / "etc").exists()
        assert list(os.listdir(store.layout.tmp)) == []
    finally:
        store.close()


def test_a_planted_symlink_cannot_lead_a_write_outside(tmp_path):
    root = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Store(str(root))
    store.open()
    try:
        (root / "bucket").mkdir()
        os.symlink(outside, root / "bucket" / "link")
        rel = store.prepare(ObjectRef("bucket", "link/file"))
        assert rel.startswith(".h/")
        assert list(outside.iterdir()) == []
    finally:
        store.close()
