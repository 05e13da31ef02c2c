"""Maintenance (s3cache/maintenance.py) on a real cache dir and index: reconcile settles interrupted
publishes, rebuild re-verifies files against the manifest or S3 (moto), verify quarantines a damaged
file and queues the object again."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import replace

import pytest
from parts import Rig, catalog, entry

from s3cache.daemon.maintenance import Maintenance, open_index
from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.store.index import PUBLISHING, READY

B = "s3://bkt/"


def no_s3(entry):
    raise AssertionError(f"asked S3 about {entry.uri}")


def maintenance(rig, describe=no_s3) -> Maintenance:
    return Maintenance(rig.store, rig.index, rig.space, rig.schedule, rig.cond, describe=describe)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    yield r
    r.close()


def test_reconcile_completes_good_intents_and_drops_rows_without_a_file(rig):
    ok = rig.cached(B + "ok", b"o" * 4)
    intent = rig.cached(B + "intent", b"i" * 4)
    torn = rig.cached(B + "torn", b"t" * 4)
    lost = rig.cached(B + "lost", b"l" * 4)
    rig.index.put_many([(B + "intent", replace(intent, state=PUBLISHING)),
                        (B + "torn", replace(torn, state=PUBLISHING, crc32c="00000000"))])
    os.unlink(rig.store.layout.abspath(lost.path))
    with rig.cond:
        for u in (B + "ok", B + "intent", B + "torn", B + "lost"):
            rig.space.forget(u)  # a fresh start: nothing in memory yet
    maintenance(rig).reconcile()
    assert sorted(rig.space.ready) == [B + "intent", B + "ok"] and rig.space.used == 8
    assert rig.index.get(B + "intent").state == READY and rig.index.get(B + "ok") == ok
    assert rig.index.get(B + "torn") is None and rig.index.get(B + "lost") is None
    assert not os.path.exists(rig.store.layout.abspath(torn.path))


def test_an_empty_index_beside_cached_files_is_rebuilt_from_the_manifests_checksums(rig):
    good, bad = b"good bytes", b"bad bytes"
    for name, data in (("good", good), ("bad", bad)):
        path = rig.store.layout.abspath(rig.store.prepare(entry(B + name).ref))
        with open(path, "wb") as f:
            f.write(data)
    rig.index.close()
    index, damaged = open_index(rig.store)
    rig.index = index
    assert damaged and len(index) == 0
    cat = catalog(entry(B + "good", sha256=hashlib.sha256(good).hexdigest()),
                  entry(B + "bad", sha256=hashlib.sha256(b"other").hexdigest()))
    m = Maintenance(rig.store, index, rig.space, rig.schedule, rig.cond, describe=no_s3)
    m.rebuild(cat)
    assert list(rig.space.ready) == [B + "good"] and index.get(B + "good").method == "sha256"
    assert not os.path.exists(rig.store.layout.abspath("bkt/bad"))


def test_rebuild_asks_s3_for_a_checksum_the_manifest_does_not_give(rig, moto, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"from s3")
    path = rig.store.layout.abspath(rig.store.prepare(entry(f"s3://{bucket}/k").ref))
    with open(path, "wb") as f:
        f.write(b"from s3")
    client = make_client(moto.url, "us-east-1", pool=2, connect_timeout=5, read_timeout=10)
    fetcher = Fetcher(client, part_size=1 << 20, prefetch_part_size=1 << 20, workers=1, max_attempts=2,
                      cancel=threading.Event(), new_temp=rig.store.new_temp, discard=rig.store.discard)
    try:
        maintenance(rig, describe=fetcher.describe).rebuild(catalog())
    finally:
        fetcher.close()
    assert rig.space.is_ready(f"s3://{bucket}/k") and rig.index.get(f"s3://{bucket}/k").etag


def test_verify_quarantines_a_damaged_file_and_fetches_the_object_again(rig):
    rig.install(catalog(entry(B + "a"), entry(B + "b")))
    rec = rig.cached(B + "b", b"b" * 8)
    rig.cached(B + "a", b"a" * 8)
    rig.schedule.cursors.next(lambda p: False)  # the in-order scan passed both
    with open(rig.store.layout.abspath(rec.path), "r+b") as f:
        f.write(b"X")  # a bit flipped on disk
    report = maintenance(rig).verify([], everything=True, source=False)
    assert report["checked"] == 2 and report["ok"] == 1 and report["not_cached"] == []
    [bad] = report["mismatched"]
    assert bad["uri"] == B + "b" and bad["quarantined"].startswith(rig.store.layout.quarantine)
    assert not rig.space.is_ready(B + "b") and rig.index.get(B + "b") is None
    assert list(rig.schedule.demand) == [entry(B + "b")] and rig.schedule.cursors.positions() == [1]
    report = maintenance(rig).verify([B + "a", B + "nope"], everything=False, source=False)
    assert report["ok"] == 1 and report["not_cached"] == [B + "nope"]
