"""After publish (issue 28): a restart notices a ready file changed on disk while the daemon was down."""

from __future__ import annotations

import os
import time

import pytest
from parts import Rig

from s3cache.daemon.maintenance import Maintenance

B = "s3://bkt/"


def no_s3(entry, checks=True):
    raise AssertionError(f"asked S3 about {entry.uri}")


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1_000_000, lease=600.0)  # the quarantine keeps what fits in 1/64 of this: both files
    yield r
    r.close()


def test_reconcile_drops_a_ready_file_truncated_or_rewritten_on_disk(rig):
    recs = {name: rig.cached(B + name, name.encode() * 100) for name in ("ok", "touched", "short", "rewritten")}
    path = {name: rig.store.layout.abspath(rec.path) for name, rec in recs.items()}
    later = time.time() + 60
    os.truncate(path["short"], 10)
    with open(path["rewritten"], "r+b") as f:
        f.write(b"X")  # same size, other bytes
    os.utime(path["rewritten"], (later, later))
    os.utime(path["touched"], (later, later))  # touched, same bytes: kept after one re-hash
    with rig.cond:
        for name in recs:
            rig.space.forget(B + name)  # a fresh start: nothing in memory yet
    Maintenance(rig.store, rig.index, rig.space, rig.schedule, rig.cond, describe=no_s3).reconcile()
    assert sorted(rig.space.ready) == [B + "ok", B + "touched"]
    assert rig.index.get(B + "short") is None and rig.index.get(B + "rewritten") is None
    assert not os.path.exists(path["short"]) and not os.path.exists(path["rewritten"])
    assert len(os.listdir(rig.store.layout.quarantine)) == 2  # set aside, not served
