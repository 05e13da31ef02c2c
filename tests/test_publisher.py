"""The publisher (s3cache/publisher.py) on a real cache dir and index: batches become ready files and
rows, a file that cannot be renamed is failed and leaves nothing behind, the thread stops cleanly."""

from __future__ import annotations

import os
import threading

import pytest
from parts import Rig, catalog, entry

from s3cache.daemon.publisher import Publisher
from s3cache.fetch.checksum import local_crc32c_of
from s3cache.fetch.fetcher import Fetched
from s3cache.store import index
from s3cache.store.index import PUBLISHING, READY
from s3cache.store.paths import PRIVATE_DIR

B = "s3://bkt/"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    r.published, r.failed = [], []
    r.publisher = Publisher(r.store, r.index, r.space, r.cond,
                            on_published=lambda items, now: r.published.extend(u for u, _ in items),
                            on_failed=lambda uri, code, msg: r.failed.append((uri, code)))
    yield r
    r.close()


def fetched(rig, data: bytes) -> Fetched:
    tmp = rig.temp_file(data)
    return Fetched(tmp, len(data), '"etag"', "", "md5", local_crc32c_of(tmp))


def test_a_batch_becomes_ready_files_rows_and_ready_bytes(rig):
    batch = [(entry(B + n), fetched(rig, n.encode() * 10)) for n in ("a", "b")]
    for e, f in batch:
        assert rig.space.admit(e, f.size, demand=False)
    rig.publisher.publish(batch)
    assert rig.published == [B + "a", B + "b"] and rig.failed == []
    for e, f in batch:
        rec = rig.index.get(e.uri)
        assert rec.state == READY and rec.size == 10 and rec.method == "md5"
        assert open(rig.store.layout.abspath(rec.path), "rb").read() == f.size * e.uri[-1:].encode()
        assert not os.path.exists(f.tmp_path)
    assert (rig.space.used, rig.space.reserved) == (20, 0)
    assert {k: rig.publisher.status()[k] for k in ("fetched", "fetched_bytes", "superseded")} == \
        {"fetched": 2, "fetched_bytes": 20, "superseded": 0}


def test_a_file_that_cannot_be_published_is_failed_and_leaves_no_row(rig):
    good = (entry(B + "good"), fetched(rig, b"g"))
    lost = fetched(rig, b"l")
    os.unlink(lost.tmp_path)  # the rename will fail
    rig.publisher.publish([good, (entry(B + "lost"), lost)])
    assert rig.published == [B + "good"] and rig.failed == [(B + "lost", "PublishFailed")]
    assert rig.index.get(B + "lost") is None and not rig.space.is_ready(B + "lost")
    assert os.listdir(rig.store.layout.tmp) == []


def test_the_thread_publishes_what_was_put_before_stop(rig):
    t = threading.Thread(target=rig.publisher.run)
    t.start()
    for n in ("a", "b", "c"):
        rig.publisher.put(entry(B + n), fetched(rig, b"x"))
    rig.publisher.stop()
    t.join(timeout=30)
    assert not t.is_alive()
    assert sorted(rig.published) == [B + "a", B + "b", B + "c"]


def test_a_batch_s_ready_rows_ride_with_the_next_batch_s_intents(rig):
    """The thread's way (``defer_ready``): a batch is ready in memory at once, its rows say ``publishing``
    until the next batch's transaction writes them ``ready``; ``write_pending`` writes the last ones."""
    first = [(entry(B + n), fetched(rig, b"1" * 10)) for n in ("a", "b")]
    rig.publisher.publish(first, defer_ready=True)
    assert rig.published == [B + "a", B + "b"] and all(rig.space.is_ready(B + n) for n in "ab")
    assert {rig.index.get(B + n).state for n in "ab"} == {PUBLISHING}
    assert rig.publisher.status()["ready_rows_pending"] == 2
    rig.publisher.publish([(entry(B + "c"), fetched(rig, b"2" * 10))], defer_ready=True)
    assert {n: rig.index.get(B + n).state for n in "abc"} == {"a": READY, "b": READY, "c": PUBLISHING}
    assert rig.publisher.write_pending() and rig.publisher.status()["ready_rows_pending"] == 0
    assert rig.index.get(B + "c").state == READY
    assert rig.publisher.status()["index_errors"] == 0


def test_a_deferred_row_the_index_refuses_fails_nothing(rig, monkeypatch):
    """The next batch's transaction, carrying the deferred rows, fails as a full disk makes it fail: the
    intents go alone, the batch publishes, the rows land later."""
    rig.publisher.publish([(entry(B + "a"), fetched(rig, b"a" * 10))], defer_ready=True)
    monkeypatch.setenv(index.FAULT_ENV, "1")
    monkeypatch.setattr(index, "_faults_left", [-1])  # read the variable again
    rig.publisher.publish([(entry(B + "b"), fetched(rig, b"b" * 10))], defer_ready=True)
    assert rig.published == [B + "a", B + "b"] and rig.failed == []
    assert rig.publisher.status()["index_errors"] == 1
    assert {n: rig.index.get(B + n).state for n in "ab"} == {"a": PUBLISHING, "b": PUBLISHING}
    assert rig.publisher.write_pending()
    assert {n: rig.index.get(B + n).state for n in "ab"} == {"a": READY, "b": READY}


def test_a_reload_between_the_check_and_the_commit_withdraws_the_file(rig):
    """The entry is checked against the manifest before the rename and, if a reload installed another
    manifest meanwhile, again before the commit: a file renamed while a reload changed what its entry
    claims is withdrawn, not made ready (the second check is skipped only when the manifest is the same)."""
    uri = B + "a"
    rig.install(catalog(entry(uri, 10)))
    superseded = []
    rig.publisher._on_superseded = superseded.append
    job = (entry(uri, 10), fetched(rig, b"a" * 10))
    assert rig.space.admit(job[0], 10, demand=False)
    renames = rig.store.publish

    def reload_then_rename(items):  # the reload lands while the publisher renames (no state lock held)
        rig.install(catalog(entry(uri, 10, sha256="0" * 64)))
        return renames(items)

    rig.store.publish = reload_then_rename
    rig.publisher.publish([job])
    assert superseded == [uri] and rig.published == [] and not rig.space.is_ready(uri)
    assert rig.index.get(uri) is None and rig.publisher.status()["superseded"] == 1
    visible = [f for top, _, files in os.walk(rig.store.layout.root) if PRIVATE_DIR not in top for f in files]
    assert visible == []  # the renamed file was removed again


def test_a_full_filesystem_at_the_index_commit_parks_the_job_instead_of_failing_it(small_fs):
    """The files took the filesystem's last bytes and the index's commit found no room (SQLite's
    "database or disk is full"): nothing was renamed, so the job waits for space as a download that hit
    the full disk does (``on_disk_full``). It failed with PublishFailed and a traceback in the log, seen
    once in a full run of test_disk."""
    mount = small_fs("4m")
    r = Rig(mount / "cache", max_size=1 << 20, lease=600.0)
    full: list = []
    failed: list = []
    r.publisher = Publisher(r.store, r.index, r.space, r.cond, on_published=lambda items, now: None,
                            on_failed=lambda uri, code, msg: failed.append((uri, code, msg)),
                            on_disk_full=lambda e, size: full.append((e.uri, size)))
    try:
        f = fetched(r, b"x" * 10)
        assert r.space.admit(entry(B + "a", 10), 10, demand=False)
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # every free block
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        r.publisher.put(entry(B + "a", 10), f)
        r.publisher.stop()
        r.publisher.run()
        assert failed == [] and full == [(B + "a", 10)]
        assert not os.path.exists(f.tmp_path) and r.index.get(B + "a") is None
    finally:
        (mount / "filler").unlink(missing_ok=True)
        r.close()
