"""Disk faults on real small filesystems (tmpfs mounts; needs root, skipped otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import put_objects

from s3cache import resolve
from s3cache.testing import FAKE_CREDENTIALS

KiB, MiB = 1 << 10, 1 << 20


def _mount(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    mounted: list[Path] = []

    def make(name: str, opts: str) -> Path:
        p = tmp_path / name
        if os.geteuid() != 0 or not _mount(p, opts):
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(p)
        return p

    yield make
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_full_disk_pauses_keeps_serving_and_resumes_when_space_returns(tmp_path, s3, bucket, daemons, small_fs):
    fs = small_fs("fs", "size=8m")
    filler = fs / "filler"
    filler.write_bytes(b"\0" * (5 * MiB))
    data = put_objects(s3, bucket, "o", 6, MiB)
    m = tmp_path / "m.txt"
    m.write_text("\n".join(data) + "\n")
    d = daemons(fs / "cache", manifest=m, args=["--max-size", "100M", "--min-free", "0", "--workers", "2"])
    # Admission counts the filesystem's free bytes (issue 11.2): prefetch stops before the disk is full
    # instead of running into ENOSPC, and says why.
    st = d.wait_until(lambda st: st["prefetch_paused"] and st["objects"]["fetching"] == 0
                      and any(w["limit"] == "filesystem" for w in st["waiting_for_space"]), what="the disk to fill")
    landed = [u for u in data if (fs / "cache" / u[5:]).exists()]
    assert 1 <= len(landed) < 6 and st["objects"]["ready"] == len(landed)
    assert os.listdir(fs / "cache" / ".s3cache" / "tmp") == []  # no download left behind
    assert Path(resolve(landed[0], cache_dir=d.cache_dir)).read_bytes() == data[landed[0]]  # still serving
    assert "no space left" not in d.log() and not st["disk_full"]
    filler.unlink()  # space returns
    d.wait_until(lambda st: st["objects"]["ready"] == 6 and not st["disk_full"], what="fetching to resume")
    assert [Path(p).read_bytes() for p in resolve(list(data), cache_dir=d.cache_dir)] == list(data.values())


def test_full_disk_evicts_files_already_read(tmp_path, s3, bucket, daemons, small_fs):
    fs = small_fs("fs", "size=4m")
    data = put_objects(s3, bucket, "o", 6, MiB)
    d = daemons(fs / "cache", args=["--max-size", "100M", "--min-free", "0", "--lease", "0"])
    for uri, body in data.items():
        p = resolve(uri, cache_dir=d.cache_dir, timeout=120)
        assert Path(p).read_bytes() == body
    st = d.status()
    assert st["evicted"] >= 2 and st["objects"]["failed"] == 0


def test_read_only_cache_dir_is_a_clear_error(tmp_path, moto, small_fs):
    ro = small_fs("ro", "size=1m,ro")
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(ro / "cache"),
                        "--endpoint-url", moto.url], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **FAKE_CREDENTIALS})
    assert r.returncode == 1
    assert "read-only" in r.stderr and "Traceback" not in r.stderr


def test_vanished_cache_dir_stops_the_daemon_with_a_clear_error(tmp_path, s3, bucket, daemons):
    import shutil

    d = daemons(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")
    assert d.proc.wait(60) == 1
    d.proc = None
    assert "vanished" in d.log() and "Traceback" not in d.log()


def test_min_free_pauses_prefetch_before_the_disk_is_full(tmp_path, s3, bucket, daemons, small_fs):
    fs = small_fs("fs", "size=8m")
    data = put_objects(s3, bucket, "o", 6, MiB)
    m = tmp_path / "m.txt"
    m.write_text("\n".join(data) + "\n")
    filler = fs / "filler"
    filler.write_bytes(b"\0" * (3 * MiB))
    # 8 MiB filesystem, 3 MiB taken: prefetch must stop while 40% is still free, without hitting ENOSPC.
    d = daemons(fs / "cache", manifest=m, args=["--max-size", "100M", "--min-free", "0.4", "--workers", "1"])
    st = d.wait_until(lambda st: st["prefetch_paused"] and st["objects"]["fetching"] == 0)
    assert st["bytes"]["free_fraction"] >= 0.3 and not st["disk_full"]
    assert st["objects"]["ready"] < 6
    assert "no space left" not in d.log()
    # A reader still gets what it asks for: min-free holds back prefetch, not demand.
    missing = [u for u in data if not (fs / "cache" / u[5:]).exists()][0]
    assert Path(resolve(missing, cache_dir=d.cache_dir, timeout=120)).read_bytes() == data[missing]
