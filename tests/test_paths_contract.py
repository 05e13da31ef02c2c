"""The cache dir's layout as a contract (issue 21, mutants mutmut found alive in paths.py): a cache written
by one version is read by the next, so the hashed form, its basename and the readable form's limits are
pinned here exactly. And is_within: a path that resolves outside the root is outside."""

import os

import pytest

from s3cache.manifest.refs import ObjectRef
from s3cache.store.paths import (
    MAX_READABLE_BYTES,
    MAX_SEGMENT_BYTES,
    candidates,
    hashed_path,
    is_within,
    object_digest,
    readable_path,
)


def test_the_hashed_form_is_pinned():
    # sha256(bucket NUL key), its first 128 bits in hex, fanned out by the first two digits.
    ref = ObjectRef("bkt", "train/shard-00001.tfrecord")
    assert object_digest(ref) == "678ad9938706481728a2640dbe72cd0d"
    assert hashed_path(ref) == ".h/67/678ad9938706481728a2640dbe72cd0d/shard-00001.tfrecord"
    assert object_digest(ObjectRef("bkt", "é")) == __import__("hashlib").sha256(b"bkt\x00\xc3\xa9").hexdigest()[:32]


@pytest.mark.parametrize("key,basename", [
    ("dir/sub/", "sub"),  # a key ending in / is named for its last segment
    ("dir/MAX/", "MAX"),
    ("a b/c d.txt", "c_d.txt"),  # what a file name should not hold becomes _
    ("a/..hidden", "hidden"),  # never a dot file, never . or ..
    ("a/file.", "file."),
    ("Xray.jpg", "Xray.jpg"),
    ("a/...", "object"),  # nothing left: a name anyway
    ("a/..", "object"),
    ("a" * 100, "a" * 100),  # up to 100 characters as they are
    ("a" * 101, "a" * 99),  # longer: cut to 99
    ("a" * 150 + ".tfrecord", "a" * 91 + ".tfrecord"),  # ... keeping the extension, 100 in all
    ("x.y." + "a" * 150 + ".gz", "x.y." + "a" * 93 + ".gz"),  # the last one
    ("a" * 150 + "." + "e" * 25, "a" * 79 + "." + "e" * 20),  # at most 20 characters of it
    ("a" * 10 + "." + "e" * 100, "a" * 10 + "." + "e" * 20),  # ... and the name before it stays whole
])
def test_the_hashed_basename_keeps_the_extension_and_stays_short(key, basename):
    got = hashed_path(ObjectRef("bkt", key)).rsplit("/", 1)[1]
    assert got == basename
    assert len(got) <= 100


def test_a_segment_of_exactly_255_bytes_is_readable_and_256_is_not():
    seg = "é" * (MAX_SEGMENT_BYTES // 2) + "x"
    assert len(seg.encode()) == MAX_SEGMENT_BYTES
    assert readable_path(ObjectRef("bkt", f"d/{seg}")) == f"bkt/d/{seg}"
    assert readable_path(ObjectRef("bkt", f"d/{seg}x")) is None
    assert candidates(ObjectRef("bkt", f"d/{seg}x")) == (hashed_path(ObjectRef("bkt", f"d/{seg}x")),)


def test_a_key_of_exactly_1024_bytes_is_readable():
    key = "/".join(["s" * 200] * 5) + "/" + "t" * (MAX_READABLE_BYTES - 1005)
    assert len(key.encode()) == MAX_READABLE_BYTES
    assert readable_path(ObjectRef("bkt", key)) == f"bkt/{key}"


def test_is_within_follows_dotdot_and_symlinks(tmp_path):
    root = tmp_path / "cache"
    (root / "a").mkdir(parents=True)
    (tmp_path / "cache2").mkdir()
    os.symlink(tmp_path, root / "a" / "out")
    assert is_within(str(root), str(root))
    assert is_within(str(root), str(root / "a" / "b"))
    assert is_within(str(root), str(root / "a" / ".." / "c"))
    assert not is_within(str(root), str(root / ".." / "x"))
    assert not is_within(str(root), str(tmp_path / "cache2" / "f"))  # a sibling sharing the prefix
    assert not is_within(str(root), str(root / "a" / "out" / "f"))  # through a symlink out
