"""A version known to be superseded is never served as current (issue 26.8): after ``verify --source``
finds an object changed in S3, (a) a refetch whose admission is refused once is tried again when room
comes, and the reader gets the new bytes; (b) a new version that can never fit (TooLarge) takes the old
copy out of service, and the reader gets an error naming why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_manifest

from s3cache import resolve
from s3cache.cli import main
from s3cache.errors import S3CacheError
from s3cache.testing import wait_for

KiB = 1024


def verify_source(d, uri: str) -> None:
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", uri])
    assert r.exit_code == 0 and uri in r.output, r.output


def test_a_refetch_refused_room_once_is_tried_again_and_served(tmp_path, s3, bucket, daemons):
    a, b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    s3.put_object(Bucket=bucket, Key="a", Body=os.urandom(100 * KiB))
    s3.put_object(Bucket=bucket, Key="b", Body=os.urandom(100 * KiB))
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [a, b]),
                args=["--max-size", str(400 * KiB), "--lease", "5"])
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    # both leased for 5 s, and a (being replaced anyway) the file the reader is on: b can go after 5 s
    resolve([b, a], cache_dir=d.cache_dir, timeout=30)
    d.wait_until(lambda st: st["leases"]["files"] == 2, what="the reader's leases")
    new = os.urandom(250 * KiB)  # fits beside the old copy only once b's lease ends and b can go
    s3.put_object(Bucket=bucket, Key="a", Body=new)
    verify_source(d, a)
    wait_for(lambda: "waits for room" in d.log() or "prefetch waits" in d.log() or d.status()["waiting_for_space"],
             30, "the refetch's admission refused")
    path = d.cache_dir / bucket / "a"
    # the old copy may go first, to make room for the new one
    d.wait_until(lambda st: st["fetched"] == 3, 60, "the new version once the leases end")
    assert path.read_bytes() == new
    assert Path(resolve([a], cache_dir=d.cache_dir, timeout=30)[0]).read_bytes() == new


def test_a_new_version_that_can_never_fit_takes_the_old_copy_out_of_service(tmp_path, s3, bucket, daemons):
    a = f"s3://{bucket}/a"
    s3.put_object(Bucket=bucket, Key="a", Body=os.urandom(100 * KiB))
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [a]), args=["--max-size", str(400 * KiB)])
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    s3.put_object(Bucket=bucket, Key="a", Body=os.urandom(500 * KiB))  # larger than --max-size
    verify_source(d, a)
    st = d.wait_until(lambda st: any(f["uri"] == a for f in st["failures"]), what="the refetch to fail")
    assert [f["code"] for f in st["failures"]] == ["TooLarge"]
    d.wait_until(lambda st: st["objects"]["ready"] == 0, what="the superseded copy out of service")
    with pytest.raises(S3CacheError, match="TooLarge"):
        resolve([a], cache_dir=d.cache_dir, timeout=30)
