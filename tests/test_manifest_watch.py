"""The manifest watch (s3cache/manifest_watch.py) on a real file and a real watchdog observer: it reads,
records listing errors, installs each saved version once settled, and keeps the last good one."""

from __future__ import annotations

import os
import threading

import pytest

from s3cache.daemon.manifest_watch import ManifestWatch
from s3cache.errors import FetchFailed
from s3cache.manifest.catalog import Catalog
from s3cache.testing import wait_for


def refuse(bucket: str, prefix: str):
    raise FetchFailed(f"s3://{bucket}/{prefix}", "AccessDenied")


def _watch(tmp_path, **kw):
    """A watch on a one-line manifest that installs into a list, with its reload thread (not started);
    stops both when the test is done."""
    path = tmp_path / "m.txt"
    path.write_text("s3://bkt/a\n")
    installed: list[Catalog] = []
    stopping = threading.Event()
    w = ManifestWatch(str(path), lister=refuse, install=installed.append, stopping=stopping, **kw)
    thread = threading.Thread(target=w.reload_loop)
    yield path, w, installed, thread
    stopping.set()
    w.wake()
    if thread.ident is not None:
        thread.join(timeout=10)
    w.stop()


@pytest.fixture
def watched(tmp_path):
    yield from _watch(tmp_path)


def test_a_prefix_that_cannot_be_listed_is_an_error_not_a_failure(watched):
    path, w, _, _ = watched
    path.write_text("s3://bkt/a\ns3://bkt/dir/\n")
    cat = w.read()
    assert len(cat) == 1 and "s3://bkt/a" in cat
    assert len(w.errors) == 1 and "cannot list s3://bkt/dir/" in w.errors[0] and "AccessDenied" in w.errors[0]


def test_each_saved_version_is_installed_and_a_broken_one_is_not(watched, caplog):
    path, w, installed, thread = watched
    caplog.set_level("ERROR", logger="s3cache.daemon")
    assert len(w.read()) == 1
    w.watch()
    thread.start()
    tmp = path.with_suffix(".new")
    tmp.write_text("s3://bkt/a\ns3://bkt/b\n")
    os.rename(tmp, path)  # an editor's save
    wait_for(lambda: installed and len(installed[-1]) == 2, 30, "the new manifest to be installed")
    count = len(installed)
    tmp.write_text("s3://bkt/a size=notanumber\n")
    os.rename(tmp, path)
    wait_for(lambda: "manifest not reloaded, keeping the previous one" in caplog.text, 30, "the reload to fail")
    assert len(installed) == count
    tmp.write_text("s3://bkt/c\n")
    os.rename(tmp, path)
    wait_for(lambda: len(installed[-1]) == 1 and "s3://bkt/c" in installed[-1], 30, "the fixed manifest")


@pytest.fixture
def slow_settle(tmp_path):
    """A watch that wants a written manifest to hold still for a minute before it is read."""
    yield from _watch(tmp_path, settle=60.0)


def test_a_manifest_renamed_into_place_is_read_without_waiting_for_it_to_hold_still(slow_settle):
    """A rename puts a whole file in place: the version it brings is installed at once, not after the
    minute of --manifest-settle a file written in place must hold still for (a job renaming its
    manifest into place waited that settle before its files were fetched)."""
    path, w, installed, thread = slow_settle
    os.utime(path, (0, 0))  # written long ago: start-up reads it at once
    assert len(w.read()) == 1
    w.watch()
    thread.start()
    tmp = path.with_suffix(".new")
    tmp.write_text("s3://bkt/a\ns3://bkt/b\n")  # written just now: in place, it would wait a minute
    os.replace(tmp, path)
    wait_for(lambda: installed and len(installed[-1]) == 2, 30, "the renamed manifest to be installed")


def test_a_manifest_written_in_place_still_waits_to_hold_still(slow_settle, caplog):
    """The rename's shortcut is not taken for a write in place: that version may be half-written, and
    is read only once it has held still for --manifest-settle."""
    path, w, installed, thread = slow_settle
    caplog.set_level("INFO", logger="s3cache.daemon")
    os.utime(path, (0, 0))
    assert len(w.read()) == 1
    w.watch()
    thread.start()
    path.write_text("s3://bkt/a\ns3://bkt/b\n")
    wait_for(lambda: "modified" in caplog.text and "ago" in caplog.text, 30, "the watch to wait for it to hold still")
    assert installed == []


def test_a_job_file_renamed_into_a_manifest_directory_is_read_without_waiting(tmp_path):
    """Under --manifest-dir the same holds per job file: a job renamed into the directory (its temporary
    written beside it under a name that is not a job's) is installed at once despite a minute of settle."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "a.txt").write_text("s3://bkt/a\n")
    os.utime(jobs / "a.txt", (0, 0))
    installed: list[Catalog] = []
    stopping = threading.Event()
    w = ManifestWatch(str(jobs), lister=refuse, install=installed.append, stopping=stopping, settle=60.0,
                      directory=True)
    thread = threading.Thread(target=w.reload_loop)
    try:
        assert len(w.read()) == 1
        w.watch()
        thread.start()
        tmp = jobs / ".b.txt.tmp"
        tmp.write_text("s3://bkt/b\ns3://bkt/c\n")
        os.replace(tmp, jobs / "b.txt")
        wait_for(lambda: installed and len(installed[-1]) == 3, 30, "the renamed job to be installed")
    finally:
        stopping.set()
        w.wake()
        if thread.ident is not None:
            thread.join(timeout=10)
        w.stop()
