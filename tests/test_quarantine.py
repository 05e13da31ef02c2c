"""The quarantine (``.s3cache/quarantine``: files a failed re-verification set aside) is bounded, counted
against --max-size and shown in status. It used to grow for ever, outside --max-size, unseen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_manifest
from parts import Rig

from s3cache.cli import main
from s3cache.store.files import QUARANTINE_KEEP, QUARANTINE_SHARE

B = "s3://bkt/"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=64_000, lease=600.0)  # a quarantine budget of 1,000 bytes
    yield r
    r.close()


def _quarantine(rig: Rig, uri: str, data: bytes) -> str:
    rec = rig.cached(uri, data)
    with rig.space.exclusive():
        done, where, error = rig.space.withdraw(uri, rec, quarantine=True)
    assert done and where and error is None
    return where


def test_the_newest_files_stay_within_the_budget_and_count_against_the_maximum(rig):
    assert rig.s.max_size // QUARANTINE_SHARE == 1000
    free = rig.space.free()
    where = [_quarantine(rig, f"{B}k{i}", bytes([i]) * 300) for i in range(5)]
    left = sorted(os.listdir(rig.store.layout.quarantine))
    assert [os.path.join(rig.store.layout.quarantine, n) for n in left] == sorted(where[-3:])  # the newest 3
    assert rig.space.quarantine_status() == {"files": 3, "bytes": 900, "budget": 1000}
    assert rig.space.free() == free - 900  # counted against --max-size while they stay
    big = _quarantine(rig, f"{B}big", b"z" * 5000)  # over the budget alone: kept, as the newest
    assert os.listdir(rig.store.layout.quarantine) == [os.path.basename(big)]
    assert rig.space.quarantine_status()["bytes"] == 5000 and rig.space.free() == free - 5000


def test_at_most_a_few_files_stay_and_files_held_unverified_are_never_pruned(rig):
    held = _quarantine(rig, f"{B}held", b"h" * 10)
    rig.index.set_meta("unverified", {f"{B}held": ["bkt/held", held]})  # as recovery records them
    for i in range(QUARANTINE_KEEP + 4):
        _quarantine(rig, f"{B}s{i}", b"s")
    names = os.listdir(rig.store.layout.quarantine)
    assert os.path.basename(held) in names and len(names) == QUARANTINE_KEEP
    assert rig.space.quarantine_status()["files"] == QUARANTINE_KEEP


def test_verify_fills_the_quarantine_only_up_to_its_budget_and_status_shows_it(tmp_path, s3, bucket, daemons):
    uris = [f"s3://{bucket}/k{i}" for i in range(6)]
    for u in uris:
        s3.put_object(Bucket=bucket, Key=u.rsplit("/", 1)[1], Body=b"good" * 750)  # 3,000 bytes
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris), args=["--max-size", "640K"])  # budget 10 KiB
    d.wait_until(lambda st: st["objects"]["ready"] == 6)
    for u in uris:
        Path(d.cache_dir, bucket, u.rsplit("/", 1)[1]).write_bytes(b"evil" * 750)  # same size, other bytes
    args = ["--cache-dir", str(d.cache_dir)]
    r = CliRunner().invoke(main, ["verify", *args, "--all"])
    assert r.exit_code == 1 and sum(x.startswith("corrupt ") for x in r.stdout.splitlines()) == 6, r.output
    st = d.wait_until(lambda st: st["objects"]["ready"] == 6, what="the objects fetched again")
    assert st["quarantine"] == {"files": 3, "bytes": 9000, "budget": 10240}
    assert len(os.listdir(d.cache_dir / ".s3cache" / "quarantine")) == 3
    r = CliRunner().invoke(main, ["status", *args])
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("quarantine ")]
    assert line.startswith("quarantine  3 files (8.8 KiB, counted against the maximum"), line
