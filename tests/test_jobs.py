"""Many jobs on one host (issue 14 part 3): ``serve --manifest-dir``, every NAME.txt a job's manifest.

The pure parts (which job a position is in, readers wrapping within their job, the round-robin cursors,
a directory read into one catalog) are checked directly; the daemon's behaviour end to end, against
moto over HTTP: jobs added and retired by writing and removing files, prefetch taking them in turn,
a retired job's files evicted before a live job's, per-job status, a bad job file named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from s3cache.errors import ManifestError
from s3cache.manifest import file as manifest_file
from s3cache.manifest.jobs import Cursors, Jobs, job_name
from s3cache.manifest.shard import Shard
from s3cache.policy import evict, tracker

KiB = 1024


def put_job(d: Path, name: str, lines: list[str]) -> Path:
    """Write a job's manifest the safe way: elsewhere in the directory, then renamed into place."""
    tmp = d / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, d / f"{name}.txt")
    return d / f"{name}.txt"


def no_listing(bucket, prefix):
    raise AssertionError("no prefix lines here")


# -- the pure parts -----------------------------------------------------------------------------------


def test_job_names_are_the_txt_files_and_nothing_else():
    assert job_name("train.txt") == "train" and job_name("a.b.txt") == "a.b"
    assert job_name(".train.txt.swp") is None and job_name(".hidden.txt") is None
    assert job_name("notes.md") is None and job_name(".txt") is None and job_name("..data") is None


def test_a_reader_wraps_within_its_own_job_never_into_the_next():
    jobs = Jobs(["a", "b"], [0, 4], 10)  # a: 0..3, b: 4..9
    assert [jobs.next(p) for p in (0, 3, 4, 9)] == [1, 0, 5, 4]
    assert jobs.distance(2, reader_next=3) == 3  # around a's end, back to 2: 3, 0, 1, 2
    assert jobs.distance(5, reader_next=3) is None  # a's reader never reads b's files
    assert [jobs.ahead(8, k) for k in range(7)] == [8, 9, 4, 5, 6, 7, None]
    fut = evict.Future(10, [3, 8], jobs=jobs)
    assert fut.distance(0) == 1 and fut.distance(4) == 2 and fut.distance(7) == 5
    assert list(fut.upcoming())[:4] == [(0, 3), (0, 8), (1, 0), (1, 9)]


def test_a_job_nobody_reads_in_order_is_prefetched_into_free_room_after_the_readers_needs():
    # a reader in order in a (0-4); nobody in b (5-9) yet: b's files come after every need a reader made
    # known, in b's order, so b is neither starved of prefetch nor the first to be evicted for a
    jobs = Jobs(["a", "b"], [0, 5], 10)
    fut = evict.Future(10, [2], jobs=jobs)
    assert fut.distance(3) == 1 and fut.distance(7) == 12
    assert list(fut.upcoming()) == [(0, 2), (1, 3), (2, 4), (3, 0), (4, 1), (10, 5), (11, 6), (12, 7),
                                    (13, 8), (14, 9)]
    # a's files all there: b's next, but only into free room (beyond any readahead window)
    wanted = lambda q: q >= 5  # noqa: E731
    assert evict.next_prefetch(fut, wanted, lambda q: 100, window=4, free=1000) == (5, False)
    assert evict.next_prefetch(fut, wanted, lambda q: 100, window=4, free=10) == (None, True)


def test_the_tracker_counts_a_readers_steps_and_epochs_within_its_job():
    t = tracker.ReaderTracker()
    t.jobs = Jobs(["a", "b"], [0, 4], 10)
    for i, p in enumerate([4, 5, 6, 7, 8, 9]):
        t.saw("r", p, 10, float(i))
    assert t.positions(10, 6.0) == [4]  # at b's last file: next is b's first, not a's
    assert t.saw("r", 4, 10, 7.0) == 1  # back to b's first file: its next epoch


def test_one_jobs_prefetch_never_evicts_what_another_jobs_reader_reads_next():
    # a: positions 0-4, its reader's next file 1; b: 5-9, its reader at b's last file (next: 9, then 5)
    jobs = Jobs(["a", "b"], [0, 5], 10)
    residents = [evict.Resident(f"s3://bkt/{p}", 1, 1.0, 0.0, p) for p in (2, 5)]
    kw = dict(need=1, extra=0, readers=[1, 9], n=10, demand=False, now=2.0, lease=0.0)
    # a's prefetch of position 3 (a's reader needs it after 1 and 2): b's 5 is b's reader's next-but-one
    fut = evict.Future(10, [1, 9], jobs=jobs)
    target = evict.target_distance(3, False, fut, 10)
    assert target == 2 and fut.distance(5) == 1
    assert evict.choose_victims(residents, target_distance=target, future=fut, **kw) is None
    # read as one list, b's reader would run on into a's files and 5 would look 4 files away: evicted
    flat = evict.Future(10, [1, 9])
    assert evict.choose_victims(residents, target_distance=evict.target_distance(3, False, flat, 10),
                                future=flat, **kw) == [residents[1]]


def test_cursors_take_the_jobs_in_turn_one_file_each():
    c = Cursors(Jobs(["a", "b", "c"], [0, 5, 6], 8), 8)  # a: 5 files, b: 1, c: 2
    taken: list[int] = []
    while (p := c.next(lambda q: q not in taken)) is not None:
        taken.append(p)
    assert taken == [0, 5, 6, 1, 7, 2, 3, 4]
    c.rewind(6)  # evicted unread: c's scan goes back to it, the others' stay at their ends
    assert c.next(lambda q: q == 6) == 6 and c.positions() == [5, 6, 6]


def test_a_directory_reads_into_one_catalog_of_jobs_in_name_order(tmp_path):
    put_job(tmp_path, "b", [f"s3://bkt/b{i} size={i + 1}" for i in range(3)])
    put_job(tmp_path, "a", [f"s3://bkt/a{i} size=10" for i in range(4)])
    (tmp_path / "README").write_text("not a job\n")
    loaded = manifest_file.load_dir(str(tmp_path), no_listing, settle=0)
    cat = loaded.catalog
    assert [e.ref.key for e in cat.entries()] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert cat.jobs.names == ["a", "b"] and cat.jobs.starts == [0, 4] and cat.job_bytes == [40, 6]
    # --shard applies within each job, as each job's workers shard their own list
    half = manifest_file.load_dir(str(tmp_path), no_listing, Shard(1, 2), settle=0).catalog
    assert [e.ref.key for e in half.entries()] == ["a1", "a3", "b1"]
    assert half.jobs.starts == [0, 2]


def test_a_bad_line_in_any_job_names_its_file_and_line(tmp_path):
    put_job(tmp_path, "a", ["s3://bkt/ok"])
    put_job(tmp_path, "b", ["s3://bkt/fine", "s3://bkt/x size=twelve"])
    with pytest.raises(ManifestError) as e:
        manifest_file.load_dir(str(tmp_path), no_listing, settle=0)
    assert str(tmp_path / "b.txt") in str(e.value) and ":2" in str(e.value)


def test_a_dangling_job_link_is_an_error_and_a_directory_named_like_a_job_is_not_a_job(tmp_path):
    put_job(tmp_path, "a", ["s3://bkt/ok"])
    (tmp_path / "sub.txt").mkdir()  # not a manifest: skipped, not an error on every reload
    assert manifest_file.load_dir(str(tmp_path), no_listing, settle=0).catalog.jobs.names == ["a"]
    (tmp_path / "b.txt").symlink_to(tmp_path / "gone.txt")  # a broken job, not a retired one
    with pytest.raises(ManifestError, match="b.txt.*symlink to a missing file"):
        manifest_file.load_dir(str(tmp_path), no_listing, settle=0)


def test_a_job_being_written_is_read_again_later(tmp_path):
    from s3cache.errors import ManifestUnstable

    put_job(tmp_path, "a", ["s3://bkt/k"])
    with pytest.raises(ManifestUnstable) as e:
        manifest_file.load_dir(str(tmp_path), no_listing, settle=60)
    assert "a.txt" in str(e.value)
    # unchanged since that attempt: taken as stable whatever the clock says
    assert len(manifest_file.load_dir(str(tmp_path), no_listing, settle=60, seen=e.value.identity).catalog) == 1


# -- the daemon --------------------------------------------------------------------------------------


def ready_order(log: str, bucket: str) -> list[str]:
    return re.findall(rf"ready s3://{bucket}/(\S+) ", log)


def test_prefetch_takes_the_jobs_in_turn_and_status_shows_each(tmp_path, s3, bucket, daemons):
    for job, n in (("long", 12), ("short", 3)):
        for i in range(n):
            s3.put_object(Bucket=bucket, Key=f"{job}/{i:02d}", Body=os.urandom(2 * KiB))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    put_job(jobs, "long", [f"s3://{bucket}/long/{i:02d} size={2 * KiB}" for i in range(12)])
    put_job(jobs, "short", [f"s3://{bucket}/short/{i:02d}" for i in range(3)])
    d = daemons(args=["--manifest-dir", str(jobs), "--workers", "1", "--log-level", "debug"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 15)
    order = ready_order(d.log(), bucket)
    # one worker: the jobs alternate until the short one is done, not the long one first
    assert order[:6] == ["long/00", "short/00", "long/01", "short/01", "long/02", "short/02"], order
    assert st["manifest"] == str(jobs) and st["manifest_entries"] == 15
    assert st["jobs"]["long"] == {"objects": 12, "ready": 12, "bytes_total": 24 * KiB, "bytes_ready": 24 * KiB,
                                  "readers": 0, "hits": 0, "misses": 0, "hit_rate": 0.0, "wait_seconds": 0.0}
    assert st["jobs"]["short"]["ready"] == 3 and st["jobs"]["short"]["bytes_total"] == 0  # no sizes given
    assert st["jobs"]["short"]["bytes_ready"] == 6 * KiB

    from s3cache import resolve

    with open(resolve(f"s3://{bucket}/short/01", cache_dir=str(d.cache_dir), timeout=60), "rb") as f:
        assert len(f.read()) == 2 * KiB
    st = d.wait_until(lambda st: st["jobs"]["short"]["hits"] == 1)
    assert st["jobs"]["long"]["hits"] == 0 and st["jobs"]["short"]["readers"] == 1
    from click.testing import CliRunner

    from s3cache.cli import main

    shown = CliRunner().invoke(main, ["status", "--cache-dir", str(d.cache_dir)], terminal_width=200).output
    assert "job long" in shown and "12 of 12 ready" in shown
    assert "job short" in shown and "3 of 3 ready" in shown and "1 reader," in shown


def test_a_job_is_added_by_its_file_and_a_retired_jobs_files_go_first(tmp_path, s3, bucket, daemons):
    size = 4 * KiB
    for job in ("a", "b", "c"):
        for i in range(4):
            s3.put_object(Bucket=bucket, Key=f"{job}/{i}", Body=os.urandom(size))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for job in ("a", "b"):
        put_job(jobs, job, [f"s3://{bucket}/{job}/{i} size={size}" for i in range(4)])
    # room for exactly two jobs' files
    d = daemons(args=["--manifest-dir", str(jobs), "--max-size", str(8 * size), "--lease", "0",
                      "--workers", "2"])
    d.wait_until(lambda st: st["objects"]["ready"] == 8)
    assert d.status()["evicted"] == 0
    (jobs / "b.txt").unlink()  # b retires
    put_job(jobs, "c", [f"s3://{bucket}/c/{i} size={size}" for i in range(4)])  # c arrives
    st = d.wait_until(lambda st: st["jobs"].get("c", {}).get("ready") == 4 and "b" not in st["jobs"])
    assert st["evicted"] == 4 and st["jobs"]["a"]["ready"] == 4  # b's four files made the room, not a's
    cache = Path(d.cache_dir)
    assert not any(cache.rglob("b/*")) and len(list(cache.rglob("a/*"))) == 4


def test_a_bad_job_file_keeps_every_job_as_it_was_and_says_which(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="a/0", Body=b"a0")
    s3.put_object(Bucket=bucket, Key="b/0", Body=b"b0")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    put_job(jobs, "a", [f"s3://{bucket}/a/0"])
    d = daemons(args=["--manifest-dir", str(jobs)])
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    put_job(jobs, "b", [f"s3://{bucket}/b/0", "s3://no such bucket/x"])
    from s3cache.testing import wait_for

    wait_for(lambda: "b.txt:2" in d.log(), 60, "the reload error naming b.txt line 2")
    assert set(d.status()["jobs"]) == {"a"}
    put_job(jobs, "b", [f"s3://{bucket}/b/0"])  # fixed: installed
    st = d.wait_until(lambda st: st["jobs"].get("b", {}).get("ready") == 1)
    assert set(st["jobs"]) == {"a", "b"}


@pytest.mark.unclean_daemon("refusing to start is the point: the daemon exits 2")
def test_serve_refuses_a_manifest_dir_that_is_not_a_directory(tmp_path, daemons):
    f = tmp_path / "m.txt"
    f.write_text("")
    d = daemons(args=["--manifest-dir", str(f)], wait=False)
    assert d.proc.wait(timeout=60) != 0
    assert "not a directory" in d.log() and str(f) in d.log()


def test_a_file_beside_the_jobs_changes_nothing_and_reloads_nothing(tmp_path, s3, bucket, daemons):
    """An editor's swap file or a log beside the jobs: no reload (a reload forgets where every reader
    is), while a job written after it is installed as usual."""
    s3.put_object(Bucket=bucket, Key="a/0", Body=b"a0")
    s3.put_object(Bucket=bucket, Key="b/0", Body=b"b0")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    put_job(jobs, "a", [f"s3://{bucket}/a/0"])
    d = daemons(args=["--manifest-dir", str(jobs), "--log-level", "debug"])
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    (jobs / ".a.txt.swp").write_text("an editor's swap file\n")
    (jobs / "notes.log").write_text("a log\n")
    from s3cache.testing import wait_for

    wait_for(lambda: "no change to what was read; not reloaded" in d.log(), 60, "the event ignored")
    put_job(jobs, "b", [f"s3://{bucket}/b/0"])
    d.wait_until(lambda st: st["jobs"].get("b", {}).get("ready") == 1)
    installs = re.findall(rf"manifest {re.escape(str(jobs))}: \d+ entries", d.log())
    assert len(installs) == 2, installs  # at start, and for b: none for the swap file or the log
