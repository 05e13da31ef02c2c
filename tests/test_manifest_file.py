"""Reading the manifest file only when whole (issue 17.10) and following symlinks (issue 17.9)."""

import os
import threading

import pytest

from s3cache.errors import ManifestError, ManifestUnstable
from s3cache.manifest.file import identity, load, watch_plan
from s3cache.manifest.parse import Listed, read
from s3cache.manifest.shard import Shard
from s3cache.testing import wait_for


def no_listing(bucket, prefix):
    return []


def old(path):
    """A clock for which the file was last written long ago."""
    return lambda: os.stat(path).st_mtime + 3600


def test_a_stable_manifest_loads(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("s3://bkt/a size=1\ns3://bkt/p/\ns3://bkt/b\n")
    got = load(str(p), lambda b, pfx: [Listed("p/x", 5, "")], clock=old(p))
    assert [e.ref.key for e in got.catalog.entries()] == ["a", "p/x", "b"]
    assert got.identity == identity(str(p)) and got.skipped.count == 0
    half = load(str(p), lambda b, pfx: [Listed("p/x", 5, "")], Shard(1, 2), clock=old(p))
    assert [e.ref.key for e in half.catalog.entries()] == ["p/x"]


def test_a_file_written_a_moment_ago_is_not_installed_yet(tmp_path):
    """The in-place rewrite caught half-way: 'size=123' cut to 'size=12' parses, so parsing alone
    cannot tell; the file's recent mtime can."""
    p = tmp_path / "m.txt"
    p.write_text("s3://bkt/a size=12")  # the writer has not yet written the '3\n'
    assert next(read(str(p))).size == 12  # what the daemon installed before: a wrong hard expectation
    mtime = os.stat(p).st_mtime
    with pytest.raises(ManifestUnstable) as ei:
        load(str(p), no_listing, settle=0.25, clock=lambda: mtime + 0.05)
    assert 0.15 <= ei.value.retry_after <= 0.25 and "modified 0.05s ago" in str(ei.value)
    # After the settle interval it is taken as it is.
    assert load(str(p), no_listing, settle=0.25, clock=lambda: mtime + 0.3).catalog.entry(0).size == 12


def test_a_file_unchanged_since_the_last_attempt_is_stable_whatever_its_mtime(tmp_path):
    # An mtime in the future (a clock that disagrees, a network filesystem) must not block reloads forever.
    p = tmp_path / "m.txt"
    p.write_text("s3://bkt/a\n")
    future = lambda: os.stat(p).st_mtime - 60  # noqa: E731
    with pytest.raises(ManifestUnstable) as ei:
        load(str(p), no_listing, clock=future)
    assert ei.value.identity == identity(str(p))
    assert len(load(str(p), no_listing, clock=future, seen=ei.value.identity).catalog) == 1
    p.write_text("s3://bkt/a\ns3://bkt/b\n")  # changed since: not stable by that rule
    with pytest.raises(ManifestUnstable):
        load(str(p), no_listing, clock=future, seen=ei.value.identity)


def test_a_rewrite_in_place_during_the_read_is_not_installed(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("s3://bkt/p/\n" + "".join(f"s3://bkt/k{i} size=1\n" for i in range(10)))
    clock = old(p)

    def lister(bucket, prefix):  # runs mid-read: the writer truncates and starts over
        with open(p, "r+") as f:
            f.truncate(0)
            f.write("s3://bkt/new")
        return []

    with pytest.raises(ManifestUnstable, match="changed while it was read"):
        load(str(p), lister, clock=clock)


def test_a_parse_error_in_a_file_changing_under_the_read_is_instability_not_a_bad_manifest(tmp_path):
    p = tmp_path / "m.txt"
    lines = "".join(f"s3://bkt/k{i:05d} size=1\n" for i in range(2000))  # past the first read buffer
    p.write_text("s3://bkt/p/\n" + lines)
    clock = old(p)

    def lister(bucket, prefix):
        with open(p, "r+") as f:
            f.write("s3://bkt/p/\n" + lines.replace("size=1", "size=Z"))  # same length, bad from here on
        return []

    with pytest.raises(ManifestUnstable):
        load(str(p), lister, clock=clock)
    # The same bad content in a file that holds still is a ManifestError with its line.
    with pytest.raises(ManifestError) as ei:
        load(str(p), no_listing, clock=old(p))
    assert ei.value.line == 2


def test_a_file_renamed_over_the_manifest_during_the_read_is_read_again(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("s3://bkt/p/\ns3://bkt/a\n")
    clock = old(p)

    def lister(bucket, prefix):
        (tmp_path / "new.txt").write_text("s3://bkt/b\n")
        os.replace(tmp_path / "new.txt", p)
        return []

    with pytest.raises(ManifestUnstable):
        load(str(p), lister, clock=clock)


def test_missing_manifest_has_no_line(tmp_path):
    with pytest.raises(ManifestError) as ei:
        load(str(tmp_path / "nope.txt"), no_listing)
    assert ei.value.line is None


def configmap(root, version, text):
    """Lay out a ConfigMap volume as the kubelet does: m.txt -> ..data/m.txt, ..data -> ..VERSION."""
    d = root / f"..{version}"
    d.mkdir()
    (d / "m.txt").write_text(text)
    tmp = root / "..data_tmp"
    os.symlink(f"..{version}", tmp)
    os.replace(tmp, root / "..data")  # the atomic swap
    if not (root / "m.txt").is_symlink():
        os.symlink("..data/m.txt", root / "m.txt")


def test_watch_plan_of_a_plain_file(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("")
    plan = watch_plan(p)
    assert plan.paths == {str(p)} and plan.dirs == {str(tmp_path)}
    assert plan.relevant(str(p)) and plan.relevant(None, os.fsencode(p)) and not plan.relevant(str(tmp_path / "x"))


def test_watch_plan_follows_a_configmap_symlink_swap(tmp_path):
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    root = tmp_path / "config"
    root.mkdir()
    configmap(root, "v1", "s3://bkt/one\n")
    path = str(root / "m.txt")
    plan = watch_plan(path)
    assert plan.paths == {path, str(root / "..data"), str(root / "..v1" / "m.txt")}
    assert plan.dirs == {str(root), str(root / "..v1")}

    events, seen = [], threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            pair = (os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or ""))
            events.append(pair)
            if plan.relevant(*pair):
                seen.set()

    obs = Observer()
    for d in plan.dirs:
        obs.schedule(Handler(), d, recursive=False)
    obs.start()
    try:
        configmap(root, "v2", "s3://bkt/two\n")
        wait_for(seen.is_set, 30, "an event the watch plan calls relevant")
    finally:
        obs.stop()
        obs.join()
    # The rule the daemon used (only events naming the manifest's own absolute path) misses the swap.
    assert not any(os.path.abspath(path) in pair for pair in events)
    got = load(path, no_listing, clock=lambda: os.stat(path).st_mtime + 3600)
    assert [e.ref.key for e in got.catalog.entries()] == ["two"]
    assert str(root / "..v2" / "m.txt") in watch_plan(path).paths


def test_watch_plan_with_absolute_links_dotdot_and_a_loop(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "m.txt").write_text("")
    (tmp_path / "sub").mkdir()
    os.symlink(str(tmp_path / "real"), tmp_path / "abs")  # absolute target
    os.symlink("../abs/m.txt", tmp_path / "sub" / "m.txt")  # relative, through ..
    plan = watch_plan(tmp_path / "sub" / "m.txt")
    assert plan.paths == {str(tmp_path / "sub" / "m.txt"), str(tmp_path / "abs"), str(tmp_path / "real" / "m.txt")}
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    loop = watch_plan(tmp_path / "loop-a")  # terminates
    assert str(tmp_path / "loop-a") in loop.paths
    missing = watch_plan(tmp_path / "nowhere" / "m.txt")  # a manifest that may appear later
    assert missing.dirs == frozenset()  # nothing there to watch yet: the caller keeps its previous plan
