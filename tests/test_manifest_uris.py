"""What training code is given to follow the multi-host rule: ``s3cache.manifest_uris`` (the manifest's
URIs in order, prefix lines expanded as the daemon expands them) and ``s3cache.worker_share`` (a data
loader worker's share of a file list)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import write_manifest

import s3cache
from s3cache import ManifestError, manifest_uris, resolve, worker_share
from s3cache.testing import FAKE_CREDENTIALS


def test_prefix_lines_are_expanded_in_the_daemons_order_and_its_shards_are_that_lists(
        tmp_path, s3, bucket, moto, daemons, monkeypatch):
    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    for key in ("train/b", "train/a", "train/sub/c", "odd/with space#hash", "first"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    s3.put_object(Bucket=bucket, Key="train/folder/", Body=b"")  # a folder marker: no data, left out
    m = tmp_path / "m.txt"
    m.write_text(f"# the job's files\ns3://{bucket}/first size=5\ns3://{bucket}/train/ pin=1\n"
                 f"s3://{bucket}/odd/with%20space%23hash\ns3://{bucket}/first\n")
    uris = manifest_uris(m, endpoint_url=moto.url)
    assert uris == [f"s3://{bucket}/first", f"s3://{bucket}/train/a", f"s3://{bucket}/train/b",
                    f"s3://{bucket}/train/sub/c", f"s3://{bucket}/odd/with%20space%23hash",
                    f"s3://{bucket}/first"]  # a duplicate keeps its place: --shard counts it
    # the rule: a worker's daemon with --shard I/N holds exactly positions I, I+N, ... of this list
    d = daemons(manifest=m, args=["--shard", "1/2"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 3 and st["objects"]["queued"] == 0)
    assert st["manifest_total"] == len(uris) and st["off_share"]["count"] == 0
    for path, uri in zip(resolve(uris[1::2], cache_dir=d.cache_dir, timeout=120), uris[1::2]):
        assert open(path, "rb").read().decode() == uri.split("/", 3)[3].replace("%20", " ").replace("%23", "#")
    assert d.status()["off_share"]["count"] == 0  # every file of the share was this host's


def test_a_manifest_without_prefix_lines_needs_no_boto3_and_a_bad_line_is_named(tmp_path):
    m = write_manifest(tmp_path / "m.txt", ["s3://bkt/a%25b", "s3://bkt/c"])
    code = ("import sys, s3cache\n"
            f"print(s3cache.manifest_uris({str(m)!r}))\n"
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 loaded'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['s3://bkt/a%25b', 's3://bkt/c']"
    bad = tmp_path / "bad.txt"
    bad.write_text("s3://bkt/a\ns3://bkt/b size=12Q\n")
    with pytest.raises(ManifestError) as ei:
        manifest_uris(bad)
    assert str(ei.value).startswith(f"{bad}:2: ")


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_worker_shares_are_disjoint_cover_the_list_and_keep_its_order(n):
    files = [f"s3://bkt/f{i}" for i in range(20)]
    shares = [worker_share(files, SimpleNamespace(id=i, num_workers=n)) for i in range(n)]
    assert sorted(f for s in shares for f in s) == sorted(files)  # each file once: no record read twice
    assert all(s == [f for f in files if f in s] for s in shares)
    assert sum(len(s) for s in shares) == 20 and max(map(len, shares)) - min(map(len, shares)) <= 1
    assert worker_share(files, None) == files  # no worker processes: the whole list


def test_a_worker_outside_the_loader_is_refused():
    with pytest.raises(ValueError):
        worker_share(["a"], SimpleNamespace(id=2, num_workers=2))
