"""The store's walk below the cache root: where directories appear (only when publishing, only inside),
when they go (with the last file in them), what publish() reports, quarantine names and the name probe.

Real files in a temporary dir; the only stand-in is a directory that folds names (the kernel here has no
case-insensitive filesystem), and it exercises the real probe logic."""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3cache.errors import CacheDirError, NameFoldingFilesystem
from s3cache.manifest.refs import ObjectRef
from s3cache.store import paths, trust
from s3cache.store.files import Store


def tree(top: Path) -> dict[str, str]:
    """Every entry under ``top`` (symlinks not followed): relative path -> kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            kind = "link" if stat.S_ISLNK(st_.st_mode) else "dir" if stat.S_ISDIR(st_.st_mode) else "file"
            out[os.path.relpath(p, top)] = kind
    return out


def data_tree(root: Path) -> dict[str, str]:
    return {k: v for k, v in tree(root).items() if not k.startswith(paths.PRIVATE_DIR)}


def temp_with(store: Store, data: bytes) -> str:
    fd, tmp = store.new_temp("t")
    os.write(fd, data)
    os.close(fd)
    return tmp


@pytest.fixture
def sandbox(tmp_path):
    """A cache root beside an ``outside`` dir that planted symlinks point at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    store = Store(str(tmp_path / "cache"))
    store.open()
    root = tmp_path / "cache"
    (root / "bucket").mkdir()
    os.symlink(outside, root / "bucket" / "link")
    os.symlink(outside, root / "bucket" / "link2")
    yield store, root, outside
    store.close()


hostile_segments = st.sampled_from(["a", "b", "..", ".", "", "x.tfrecord", "\\", "c\x01", "é", "link", "link2",
                                    "A", "e\u0301", " ", "x" * 255, "y" * 256, ".s3cache", ".h"])
hostile_keys = st.one_of(
    st.lists(hostile_segments, min_size=1, max_size=8).map("/".join).filter(bool),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
            max_size=200),
    st.integers(min_value=1, max_value=600).map(lambda n: "d/" * n + "f"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=hostile_keys)
def test_nothing_is_created_outside_the_root_before_or_after_publishing(sandbox, key):
    store, root, outside = sandbox
    for name in ("link", "link2"):  # one example's key may have replaced a planted link: plant it again
        if not os.path.lexists(root / "bucket" / name):
            os.symlink(outside, root / "bucket" / name)
    around = root.parent
    before_all = tree(around)
    ref = ObjectRef("bucket", key)
    rel = store.plan(ref)
    assert tree(around) == before_all  # planning touches nothing at all
    tmp = temp_with(store, key.encode("utf-8"))
    assert store.publish([(tmp, rel)]) == [None]
    after = tree(around)
    new = set(after) - set(before_all)
    assert all(p.startswith("cache/") and not p.startswith("cache/.s3cache/") for p in new), new
    assert tree(outside) == {"keep": "file"}
    assert (root / rel).read_bytes() == key.encode("utf-8")
    assert os.path.realpath(root / rel).startswith(str(root) + os.sep)
    # depth is bounded whatever the key: bucket + 31 dirs for a readable path, .h/hh/hash for a hashed one
    assert rel.count("/") <= paths.MAX_DEPTH
    store.remove(rel)
    left = tree(around)
    # the file and every directory made for it are gone again, but for the top-level .h (kept like a
    # bucket dir, so pruning never reaches the root)
    # (a planted link at the very place is replaced by the file, and goes with it: never followed)
    assert {p: k for p, k in left.items() if p != "cache/.h"} == {p: k for p, k in before_all.items()
                                                                  if p not in ("cache/.h", "cache/" + rel)}
    assert os.listdir(root / ".h") == [] if (root / ".h").exists() else True


def test_deep_keys_take_the_hashed_form_and_make_three_directories(sandbox):
    store, root, _ = sandbox
    before = data_tree(root)
    key = "a/" * 500 + "f"
    rel = store.plan(ObjectRef("bucket", key))
    assert rel.startswith(".h/")
    assert store.publish([(temp_with(store, b"deep"), rel)]) == [None]
    made = {p for p in data_tree(root) if p not in before}
    assert sorted(v for p, v in data_tree(root).items() if p in made) == ["dir", "dir", "dir", "file"]
    # the deepest readable key still reads as itself
    ok = "/".join(["s"] * paths.MAX_DEPTH)
    assert store.plan(ObjectRef("bucket", ok)) == "bucket/" + ok
    assert store.plan(ObjectRef("bucket", ok + "/t")).startswith(".h/")
    assert store.plan(ObjectRef("bucket", "k" * 1025)).startswith(".h/")


def test_planning_a_missing_object_leaves_no_directory(sandbox):
    store, root, _ = sandbox
    before = tree(root)
    for i in range(50):
        store.plan(ObjectRef("bucket", f"nosuch/{i}/" + "x/" * 20 + "y"))
    assert tree(root) == before


def test_empty_directories_go_with_the_last_file_but_the_bucket_dir_stays(sandbox):
    store, root, _ = sandbox
    rels = []
    for key in ("p/q/r/one", "p/q/r/two", "p/other"):
        rel = store.plan(ObjectRef("bucket", key))
        assert store.publish([(temp_with(store, key.encode()), rel)]) == [None]
        rels.append(rel)
    store.remove(rels[0])
    assert (root / "bucket/p/q/r/two").exists()
    store.remove(rels[1])
    assert not (root / "bucket/p/q").exists() and (root / "bucket/p/other").exists()
    store.remove(rels[2])
    assert not (root / "bucket/p").exists()
    assert (root / "bucket").is_dir() and (root / ".s3cache").is_dir()
    hashed = store.plan(ObjectRef("bucket", "../x"))
    assert store.publish([(temp_with(store, b"h"), hashed)]) == [None]
    store.remove(hashed)
    assert os.listdir(root / ".h") == []  # .h/<hh>/<hash> went, .h stays
    store.remove("bucket/never/was")  # nothing there: no error, nothing made
    assert not (root / "bucket/never").exists()


def test_publish_reports_what_kept_each_file_out(sandbox):
    store, root, outside = sandbox
    (root / "bucket" / "file").write_text("a file")
    (root / "bucket" / "dir").mkdir()
    items = [
        (temp_with(store, b"1"), "bucket/file/below"),  # a file in the way
        (temp_with(store, b"2"), "bucket/link/below"),  # a planted symlink in the way
        (temp_with(store, b"3"), "bucket/dir"),  # a directory at the place
        (temp_with(store, b"4"), "bucket/../escape"),  # never a path paths.py makes
        (temp_with(store, b"5"), ".s3cache/tmp/x"),
        (store.layout.tmp + "/never-made", "bucket/ok2"),  # the temp file is gone
        (temp_with(store, b"6"), "bucket/ok"),
    ]
    errors = store.publish(items)
    assert isinstance(errors[0], NotADirectoryError) and errors[0].filename == "bucket/file"
    assert isinstance(errors[1], NotADirectoryError) and errors[1].filename == "bucket/link"
    assert isinstance(errors[2], IsADirectoryError)
    assert isinstance(errors[3], CacheDirError) and isinstance(errors[4], CacheDirError)
    assert isinstance(errors[5], FileNotFoundError)
    assert errors[6] is None and (root / "bucket/ok").read_bytes() == b"6"
    assert tree(outside) == {"keep": "file"}
    assert not (root.parent / "escape").exists()
    # plan() routes around each obstacle instead
    assert store.plan(ObjectRef("bucket", "file/below")).startswith(".h/")
    assert store.plan(ObjectRef("bucket", "link/below")).startswith(".h/")
    assert store.plan(ObjectRef("bucket", "dir")).startswith(".h/")
    assert store.plan(ObjectRef("bucket", "x/y"), planned={"bucket/x"}).startswith(".h/")


def test_publish_remakes_a_parent_that_an_eviction_pruned_after_prepare(sandbox):
    store, root, _ = sandbox
    rel = store.prepare(ObjectRef("bucket", "late/one"))
    assert (root / "bucket/late").is_dir()
    other = store.plan(ObjectRef("bucket", "late/two"))
    store.publish([(temp_with(store, b"2"), other)])
    store.remove(other)  # the last file in late/ went: late/ is pruned under the prepared path
    assert not (root / "bucket/late").exists()
    assert store.publish([(temp_with(store, b"1"), rel)]) == [None]
    assert (root / rel).read_bytes() == b"1"


def test_exists_does_not_follow_planted_symlinks(sandbox):
    store, root, outside = sandbox
    assert not store.exists("bucket/link/keep")
    os.symlink(outside / "keep", root / "bucket" / "alias")
    assert not store.exists("bucket/alias")
    assert not store.exists("bucket/../outside/keep")


def test_quarantine_takes_a_name_long_in_bytes_and_prunes(sandbox):
    store, root, _ = sandbox
    key = "deep/dir/" + "é" * 100  # 200 bytes in one segment: a readable path
    rel = store.plan(ObjectRef("bucket", key))
    assert rel == "bucket/" + key
    assert store.publish([(temp_with(store, b"rotten"), rel)]) == [None]
    where = store.quarantine(rel)
    assert len(os.path.basename(where).encode()) <= 255
    assert Path(where).read_bytes() == b"rotten"
    assert os.path.dirname(where) == store.layout.quarantine
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o600
    assert not (root / rel).exists() and not (root / "bucket/deep").exists()
    # the same path quarantined twice in one second keeps both copies
    assert store.publish([(temp_with(store, b"again"), rel)]) == [None]
    second = store.quarantine(rel)
    assert second != where and Path(where).read_bytes() == b"rotten"
    with pytest.raises(FileNotFoundError):
        store.quarantine(rel)  # gone: an error, never a silent success


@pytest.mark.parametrize("key", ["ü" * 127, "日本" * 42, "x" * 255, "%/" * 100 + "z"])
def test_quarantine_names_stay_under_255_bytes(key):
    name = Store.quarantine_name("bucket/" + key, 1.7e9)
    assert len(name.encode()) <= 255
    name.encode("utf-8")  # whole characters only


# == names that fold ==================================================================================


class FoldingDir:
    """A directory on a filesystem that erases case and/or Unicode normalization (casefold ext4 does
    both; APFS only the second). Not our code: the filesystem the probe is meant to detect."""

    def __init__(self, case: bool, normalization: bool) -> None:
        self.case, self.normalization = case, normalization
        self.names: dict[str, str] = {}

    def _key(self, name: str) -> str:
        if self.normalization:
            name = unicodedata.normalize("NFC", name)
        return name.casefold() if self.case else name

    def create(self, name: str) -> None:
        if self._key(name) in self.names:
            raise FileExistsError(name)
        self.names[self._key(name)] = name

    def remove(self, name: str) -> None:
        del self.names[self._key(name)]


@pytest.mark.parametrize("case,norm,expect", [
    (True, True, ["case", "unicode normalization"]),
    (True, False, ["case"]),
    (False, True, ["unicode normalization"]),
    (False, False, []),
])
def test_the_probe_names_what_a_filesystem_folds(case, norm, expect):
    d = FoldingDir(case, norm)
    assert trust.name_folding(d) == expect
    assert d.names == {}  # it cleans up after itself


def test_this_filesystem_keeps_names_apart_and_the_probe_leaves_nothing(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert trust.name_folding(trust.FdDir(fd)) == []
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_a_name_folding_cache_filesystem_is_refused_at_open(tmp_path):
    seen = []

    def probe(fd: int) -> list[str]:
        seen.append(os.fstat(fd).st_ino)
        return trust.name_folding(FoldingDir(case=True, normalization=False))

    store = Store(str(tmp_path / "cache"), name_probe=probe)
    with pytest.raises(NameFoldingFilesystem, match=r"case: two keys would share one file"):
        store.open()
    assert seen == [os.stat(tmp_path / "cache/.s3cache/tmp").st_ino]  # probed where temp files go
    ok = Store(str(tmp_path / "cache"))  # the refusal let go of the lock
    ok.open()
    ok.close()


def test_temp_names_survive_any_hint(sandbox):
    store, _, _ = sandbox
    for hint in ("a/b", "nul\x00key", "..", "é" * 60):
        fd, path = store.new_temp(hint)
        os.close(fd)
        assert os.path.dirname(path) == store.layout.tmp and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        store.discard(path)
        assert not os.path.exists(path)


def test_a_key_and_a_key_beneath_it_in_one_batch_both_land(tmp_path):
    """`a/b` planned first makes `a` a directory at publish: `a` itself must take another place, or its
    rename fails with IsADirectoryError (found by test_hostile_keys_stay_inside_the_cache_dir)."""
    from s3cache.manifest.refs import make_ref
    from s3cache.store.files import Store

    store = Store(str(tmp_path / "cache"))
    store.open()
    try:
        planned: set[str] = set()
        items = []
        for key in ("a/b", "a"):
            rel = store.plan(make_ref("bkt", key), planned)
            planned.add(rel)
            fd, tmp = store.new_temp(key)
            os.write(fd, key.encode())
            os.close(fd)
            items.append((tmp, rel))
        assert store.publish(items) == [None, None]
        assert items[0][1] == "bkt/a/b" and items[1][1] != "bkt/a"
        for tmp, rel in items:
            assert os.path.isfile(store.layout.abspath(rel))
    finally:
        store.close()


def test_planning_a_batch_refuses_taken_paths_by_lookup_not_by_scanning_the_batch(tmp_path):
    """A publisher batch's planned paths: a path under a planned file and a path a planned file lies
    under are refused (each takes its hashed place instead), and the check only looks paths up (it
    scanned every planned path per check: quadratic in the batch)."""
    from s3cache.manifest.refs import make_ref
    from s3cache.store.files import Store
    from s3cache.store.tree import Planned

    class Unscannable(Planned):
        def __iter__(self):
            raise AssertionError("is_free scanned the batch")

    store = Store(str(tmp_path / "cache"))
    store.open()
    try:
        planned = Unscannable()
        for i in range(200):
            rel = store.plan(make_ref("bkt", f"d/{i}/f"), planned)
            assert rel == f"bkt/d/{i}/f"
            planned.add(rel)
        assert planned.dirs >= {"bkt", "bkt/d", "bkt/d/7"} and "bkt/d/7" not in planned
        for key in ("d/7/f/under", "d/7"):  # under a planned file; a planned file's parent
            assert store.plan(make_ref("bkt", key), planned).startswith(".h/"), key
        assert store.plan(make_ref("bkt", "d/7/g"), planned) == "bkt/d/7/g"  # a sibling is free
        assert store.plan(make_ref("bkt", "d/7/f/g"), {"bkt/d/7/f"}).startswith(".h/")  # a plain set still works
        assert store.plan(make_ref("bkt", "d"), ["bkt/d/x"]).startswith(".h/")
    finally:
        store.close()
