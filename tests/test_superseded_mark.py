"""The "superseded" mark of a cached file whose object changed in S3 (``Record.superseded``, schema 3, and
``SUPERSEDED_BIT`` on the file), on a real cache dir and index: what a SIGKILL at any instant of
``Maintenance.supersede`` leaves is finished at start; rows of schema 2 load unmarked; a row replaced
meanwhile is never marked; a rebuild never re-verifies a marked file into service. The daemon end to end
is tests/test_verify_superseded.py."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, replace

import pytest
from parts import Rig, catalog, entry

from s3cache.daemon.maintenance import Maintenance, open_index
from s3cache.store.index import READY, Record
from s3cache.store.layout import SUPERSEDED_BIT

B = "s3://bkt/"


def no_s3(entry, checks=True):
    raise AssertionError(f"asked S3 about {entry.uri}")


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    yield r
    r.close()


def maintenance(rig) -> Maintenance:
    return Maintenance(rig.store, rig.index, rig.space, rig.schedule, rig.cond, describe=no_s3)


def marked(rig, rec: Record) -> bool:
    return bool(os.lstat(rig.store.layout.abspath(rec.path)).st_mode & SUPERSEDED_BIT)


def restart(rig) -> None:
    """What a new daemon starts from: the index and the disk, nothing in memory."""
    with rig.cond:
        for uri in list(rig.space.ready):
            rig.space.forget(uri)
        rig.schedule.replacing.clear()


def test_supersede_marks_the_row_and_the_file_and_hands_the_file_out_no_more(rig):
    rec = rig.cached(B + "a", b"old bytes")
    maintenance(rig).supersede(B + "a", rec)
    assert rig.index.get(B + "a").superseded and marked(rig, rec)
    with rig.cond:
        assert rig.space.ready_path(B + "a") is None and rig.space.is_ready(B + "a")
        assert B + "a" in rig.schedule.replacing and rig.schedule.demand.has(B + "a")
    with open(rig.store.layout.abspath(rec.path), "rb") as f:  # still readable by whoever has its path
        assert f.read() == b"old bytes"


def test_a_crash_between_the_row_and_the_file_mark_is_finished_at_start(rig):
    rec = rig.cached(B + "a", b"old bytes")
    assert rig.index.mark_superseded(B + "a", rec)  # the row is durable; the SIGKILL came before the chmod
    assert not marked(rig, rec)
    restart(rig)
    maintenance(rig).reconcile(catalog(entry(B + "a")))
    assert marked(rig, rec)
    with rig.cond:
        assert rig.space.ready[B + "a"].superseded and rig.space.ready_path(B + "a") is None
        assert B + "a" in rig.schedule.replacing and rig.schedule.demand.has(B + "a")  # fetched again


def test_a_new_version_published_before_the_crash_is_served_unmarked(rig):
    old = rig.cached(B + "a", b"old bytes")
    maintenance(rig).supersede(B + "a", old)
    new = rig.cached(B + "a", b"new bytes!")  # renamed over the old file, its row replacing the marked one
    assert new.path == old.path and not marked(rig, new) and not rig.index.get(B + "a").superseded
    restart(rig)
    maintenance(rig).reconcile(catalog(entry(B + "a")))
    with rig.cond:
        assert rig.space.ready_path(B + "a") == new.path and B + "a" not in rig.schedule.replacing


def test_a_row_replaced_or_deleted_meanwhile_is_not_marked(rig):
    rec = rig.cached(B + "a", b"old bytes")
    newer = replace(rec, fetched_at=rec.fetched_at + 1, crc32c="0badf00d")
    rig.index.put_many([(B + "a", newer)])  # a new copy's row, written before its commit
    assert not rig.index.mark_superseded(B + "a", rec)
    assert rig.index.get(B + "a") == newer
    rig.index.delete_many([B + "a"])  # evicted
    assert not rig.index.mark_superseded(B + "a", rec) and rig.index.get(B + "a") is None


def test_rows_of_schema_2_load_unmarked_and_can_be_marked(rig):
    rec = rig.cached(B + "a", b"old bytes")
    row = {k: v for k, v in asdict(rec).items() if k != "superseded"} | {"v": 2}
    rig.index._cache.set(B + "a", row)  # as a daemon of schema 2 wrote it
    assert rig.index.get(B + "a") == replace(rec, superseded=False)
    assert rig.index.mark_superseded(B + "a", rec)
    got = rig.index.get(B + "a")
    assert got.superseded and got.claims == rec.claims and got.state == READY


def test_a_rebuild_never_verifies_a_marked_file_back_into_service(rig):
    good = b"the bytes the manifest names"
    rec = rig.cached(B + "a", good)
    maintenance(rig).supersede(B + "a", rec)
    rig.index.close()
    os.unlink(os.path.join(rig.store.layout.index, "cache.db"))  # the index lost: the disk is all there is
    index, damaged = open_index(rig.store)
    rig.index = index
    restart(rig)
    assert damaged
    Maintenance(rig.store, index, rig.space, rig.schedule, rig.cond, describe=no_s3).rebuild(
        catalog(entry(B + "a", sha256=hashlib.sha256(good).hexdigest())))  # it would pass its checksum
    assert not rig.space.is_ready(B + "a") and index.get(B + "a") is None
    assert not os.path.exists(rig.store.layout.abspath(rec.path))
