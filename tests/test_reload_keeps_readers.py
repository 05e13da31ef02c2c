"""A reload keeps where each reader is (issue 26.5): a manifest read again unchanged (a ConfigMap resync,
a touch) installs nothing, and a changed one (another job's file under ``--manifest-dir``) carries each
reader's position, epoch and announced order over to the new positions instead of forgetting them."""

from __future__ import annotations

import os

from conftest import write_manifest

from s3cache import resolve
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.policy.order import Announcement, ListMap
from s3cache.policy.tracker import ReaderTracker
from s3cache.testing import wait_for


def epoch_counts(st: dict) -> dict[int, int]:
    return {e["epoch"]: e["hits"] + e["misses"] for e in st["epochs"]}


def read_in_order(d, uris: list[str]) -> None:
    for u in uris:
        resolve([u], cache_dir=d.cache_dir, timeout=60)


def test_a_manifest_read_again_unchanged_installs_nothing_and_keeps_the_readers(tmp_path, s3, bucket, daemons):
    uris = []
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=b"x" * 100)
        uris.append(f"s3://{bucket}/k{i}")
    m = write_manifest(tmp_path / "m.txt", uris)
    d = daemons(manifest=m, args=["--log-level", "debug"])
    d.wait_until(lambda st: st["objects"]["ready"] == 6, what="the manifest fetched")
    read_in_order(d, uris + uris[:2])  # a whole epoch, then into the next
    d.wait_until(lambda st: epoch_counts(st).get(1) == 2, what="the reader in its second epoch")
    installs = d.log().count(f"manifest {m}: ")
    tmp = tmp_path / "m.new"
    tmp.write_text(m.read_text())  # a ConfigMap resync: the same text, a new file
    os.rename(tmp, m)
    wait_for(lambda: "read again unchanged" in d.log() or d.log().count(f"manifest {m}: ") > installs, 30,
             "the daemon to read the resynced manifest")
    assert d.log().count(f"manifest {m}: ") == installs
    read_in_order(d, uris[2:4])
    st = d.wait_until(lambda st: epoch_counts(st).get(1) == 4, what="the reader still in its second epoch")
    assert st["readers"] == 1 and epoch_counts(st)[0] == 6


def put_job(jobs, name: str, lines: list[str]) -> None:
    tmp = jobs / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(jobs / f"{name}.txt")


def test_another_jobs_edit_keeps_a_readers_place_and_epoch(tmp_path, s3, bucket, daemons):
    for k in ("a/0", "a/1", "b/0", "b/1", "b/2", "b/3"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x" * 100)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    put_job(jobs, "a", [f"s3://{bucket}/a/0"])
    b = [f"s3://{bucket}/b/{i}" for i in range(4)]
    put_job(jobs, "b", b)
    d = daemons(args=["--manifest-dir", str(jobs)])
    d.wait_until(lambda st: st["objects"]["ready"] == 5, what="both jobs fetched")
    read_in_order(d, b + b[:1])  # job b's reader: a whole epoch, then into the next
    d.wait_until(lambda st: epoch_counts(st).get(1) == 1, what="b's reader in its second epoch")
    put_job(jobs, "a", [f"s3://{bucket}/a/0", f"s3://{bucket}/a/1"])  # every b position moves by one
    d.wait_until(lambda st: st["manifest_entries"] == 6, what="a's edit installed")
    read_in_order(d, b[1:3])
    st = d.wait_until(lambda st: epoch_counts(st).get(1) == 3, what="b's reader still in its second epoch")
    assert st["readers"] == 1 and epoch_counts(st)[0] == 4


def catalog(keys: list[str]) -> Catalog:
    return Catalog.build(Entry(ObjectRef("bkt", k)) for k in keys)


def test_the_tracker_carries_an_announced_order_over_to_the_new_positions():
    old = catalog(["a", "b", "c", "d"])
    new = catalog(["z", "d", "c", "b", "a"])  # one added in front, the rest reversed
    tracker = ReaderTracker()
    order = Announcement(seed=7, epoch=2, lists=ListMap(4), cursor=1)
    tracker.announce("r", order, 0.0)
    before = [old.entry(order.at(k)).uri for k in range(7)]  # what the reader reads next, by object
    tracker.remap(old.moved(new))
    after = tracker._readers["r"].order
    assert after.epoch == 2 and after.cursor == 1 and tracker.epoch_of("r") == 2
    assert [new.entry(after.at(k)).uri for k in range(7)] == before
    assert after.distance(new.position("s3://bkt/z")) is None  # not on the reader's list

    gone = catalog(["a", "c", "d"])  # "b" left the manifest: its place on the list maps to nothing
    tracker.remap(new.moved(gone))
    lists = tracker._readers["r"].order.lists
    assert [lists.position(j) for j in range(4)] == [0, None, 1, 2]
