"""The real daemon as a subprocess against moto's S3 server, read through the real resolve()."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import write_manifest

from s3cache import DaemonNotRunning, FetchFailed, ResolveTimeout, resolve
from s3cache.testing import FAKE_CREDENTIALS, wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1 << 10
MiB = 1 << 20


def put_many(s3, bucket, n, size, prefix="train/shard-"):
    data = {}
    for i in range(n):
        key = f"{prefix}{i:04d}.bin"
        body = os.urandom(size)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        data[f"s3://{bucket}/{key}"] = body
    return data


def settled(n_ready):
    return lambda st: st["objects"]["ready"] >= n_ready and st["objects"]["fetching"] == 0


def no_temp_files(cache: Path) -> bool:
    return os.listdir(cache / ".s3cache" / "tmp") == []


@pytest.fixture
def stalling_proxy(moto):
    """A proxy whose ``plan`` may answer a GET with headers and then hold its body (``"stall"``) until
    ``release`` is set: a download that is certainly in flight, for as long as the test needs."""
    p = FaultProxy(moto.port, stall_seconds=600).start()
    yield p
    p.release.set()
    p.stop()


def held_downloads(proxy: FaultProxy, prefix: str) -> list:
    """GETs under ``prefix`` answered with headers whose body the proxy is holding back."""
    return [x for x in proxy.seen(prefix) if x.fault == "stall" and x.status in (200, 206) and not x.done]


def test_prefetches_the_manifest_and_resolve_returns_verified_files(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 8, 200 * KiB)
    lines = [f"{u} size={len(b)} sha256={hashlib.sha256(b).hexdigest()}" for u, b in list(data.items())[:4]]
    lines += [f"{u}  # checked by ETag" for u in list(data)[4:]]
    m = write_manifest(tmp_path / "m.txt", ["# training set", *lines])
    d = daemons(manifest=m, args=["--max-size", "1G"])
    st = d.wait_until(settled(8), what="all 8 objects ready")
    assert st["objects"] == {"queued": 0, "fetching": 0, "ready": 8, "failed": 0}
    assert st["verified_by"] == {"sha256": 4, "etag-md5": 4}
    paths = resolve(list(data), cache_dir=d.cache_dir)
    assert [Path(p).read_bytes() for p in paths] == list(data.values())
    assert paths[0] == str(d.cache_dir.absolute() / bucket / "train" / "shard-0000.bin")
    assert resolve(next(iter(data)), cache_dir=d.cache_dir) == paths[0]
    assert no_temp_files(d.cache_dir)
    d.wait_until(lambda st: st["hits"] >= 9, what="the usage notes of 9 hits")


def test_manifest_order_is_fetch_order(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 12, 10 * KiB)
    order = list(data)[::-1]  # the manifest, not key order, decides
    m = write_manifest(tmp_path / "m.txt", order)
    d = daemons(manifest=m, args=["--workers", "1", "--log-level", "debug"])
    d.wait_until(settled(12))
    landed = re.findall(r"ready (s3://\S+)", d.log())
    assert landed == order


def test_prefix_lines_expand_in_key_order(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 5, KiB, prefix="p/x-")
    s3.put_object(Bucket=bucket, Key="elsewhere", Body=b"no")
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/p/"])
    d = daemons(manifest=m)
    st = d.wait_until(settled(5))
    assert st["manifest_entries"] == 5
    assert [Path(p).read_bytes() for p in resolve(list(data), cache_dir=d.cache_dir)] == list(data.values())


def test_resolve_asks_the_daemon_for_an_object_not_in_the_manifest(tmp_path, s3, bucket, daemons):
    d = daemons()
    body = os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="dir/late.bin", Body=body)
    p = resolve(f"s3://{bucket}/dir/late.bin", cache_dir=d.cache_dir, timeout=120)
    assert Path(p).read_bytes() == body
    assert d.status()["misses"] == 1


def test_failed_object_raises_its_s3_code_not_a_timeout(tmp_path, s3, bucket, daemons):
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/missing.bin"])
    d = daemons(manifest=m)
    d.wait_until(lambda st: st["objects"]["failed"] == 1)
    st = d.status()
    assert st["failures"][0]["code"] == "NoSuchKey"
    with pytest.raises(FetchFailed) as ei:
        resolve(f"s3://{bucket}/missing.bin", cache_dir=d.cache_dir, timeout=120)
    assert ei.value.code == "NoSuchKey"
    assert "missing.bin" in str(ei.value)
    with pytest.raises(FetchFailed) as ei:
        resolve(f"s3://{bucket}-nope/k", cache_dir=d.cache_dir, timeout=120)
    assert ei.value.code == "NoSuchBucket"


def test_no_daemon_is_a_prompt_typed_error(tmp_path, s3, bucket, daemons):
    with pytest.raises(DaemonNotRunning, match="s3cache serve --cache-dir"):
        resolve(f"s3://{bucket}/k", cache_dir=tmp_path / "never-served", timeout=120)
    s3.put_object(Bucket=bucket, Key="k", Body=b"kept")
    d = daemons()
    p = resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir)
    assert d.stop() == 0
    # A verified file stays readable with the daemon down; a missing one cannot arrive.
    assert resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir) == p
    with pytest.raises(DaemonNotRunning):
        resolve(f"s3://{bucket}/other", cache_dir=d.cache_dir, timeout=120)


def test_timeout_when_the_cache_is_full_of_leased_files(tmp_path, s3, bucket, daemons):
    import threading
    import time

    s3.put_object(Bucket=bucket, Key="a", Body=os.urandom(600 * KiB))
    s3.put_object(Bucket=bucket, Key="b", Body=os.urandom(600 * KiB))
    d = daemons(args=["--max-size", "1M", "--lease", "600"])
    resolve(f"s3://{bucket}/a", cache_dir=d.cache_dir, timeout=120)
    raised: list = []

    def reader() -> None:
        try:
            resolve(f"s3://{bucket}/b", cache_dir=d.cache_dir, timeout=5)
        except Exception as e:  # noqa: BLE001 - the type is asserted below
            raised.append((e, time.monotonic()))

    t = threading.Thread(target=reader)
    t.start()
    try:
        # The situation the timeout is about: b was asked for and its size learned (its first GET), no
        # fetch runs, and the reader waits, because a's lease leaves no room for it.
        d.wait_until(lambda st: st["waiting"] == 1 and st["requests"] >= 2 and st["objects"]["fetching"] == 0
                     and st["fetched"] == 1, what="b refused room while its reader waits")
        blocked_at = time.monotonic()
    finally:
        t.join(120)
    [(e, when)] = raised
    assert isinstance(e, ResolveTimeout) and "not ready in time" in str(e)
    assert blocked_at < when, "the reader timed out before b was refused room: the machine was too slow to tell"
    assert d.status()["evicted"] == 0
    assert Path(resolve(f"s3://{bucket}/a", cache_dir=d.cache_dir)).exists()


def test_an_object_larger_than_the_cache_fails_at_once(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="huge", Body=os.urandom(2 * MiB))
    d = daemons(args=["--max-size", "1M"])
    with pytest.raises(FetchFailed) as ei:
        resolve(f"s3://{bucket}/huge", cache_dir=d.cache_dir, timeout=120)
    assert ei.value.code == "TooLarge"


def test_second_daemon_on_the_same_dir_names_the_holder(tmp_path, moto, daemons):
    first = daemons()
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(first.cache_dir),
                        "--endpoint-url", moto.url], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **FAKE_CREDENTIALS})
    assert r.returncode == 1
    assert f"already served by pid {first.proc.pid}" in r.stderr
    assert "Traceback" not in r.stderr
    assert first.status()["pid"] == first.proc.pid  # the first one is untouched


def test_bad_manifest_refuses_to_start_naming_file_and_line(tmp_path, moto):
    m = write_manifest(tmp_path / "m.txt", ["s3://bkt/a", "# ok", "s3://bkt/b size=big"])
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(tmp_path / "c"),
                        "--manifest", str(m), "--endpoint-url", moto.url], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **FAKE_CREDENTIALS})
    assert r.returncode == 2
    assert f"{m}:3: size= must be a whole number" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_stops_cleanly_and_removes_temp_files(tmp_path, s3, bucket, daemons, stalling_proxy):
    data = put_many(s3, bucket, 2, 3 * MiB)
    stalling_proxy.plan = lambda m, p, q: "stall" if m == "GET" and not stalling_proxy.release.is_set() else None
    m = write_manifest(tmp_path / "m.txt", list(data))
    d = daemons(manifest=m, args=["--workers", "2", "--part-size", "1M", "--prefetch-part-size", "1M",
                                  "--endpoint-url", stalling_proxy.url])
    # In flight for certain: the proxy answered a GET's headers and holds its body, and the daemon has
    # the object's temp file open.
    wait_for(lambda: held_downloads(stalling_proxy, f"/{bucket}/") and not no_temp_files(d.cache_dir), 120,
             "a download under way, its body held at the proxy and its temp file made")
    assert d.status()["objects"]["fetching"] > 0
    proc = d.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    d.proc = None
    assert held_downloads(stalling_proxy, f"/{bucket}/")  # it stopped mid-download, not after one
    assert no_temp_files(d.cache_dir)
    assert not (d.cache_dir / ".s3cache" / "ctl.sock").exists()
    assert "stopped" in d.log()


def test_manifest_edits_are_picked_up(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 4, KiB)
    uris = list(data)
    m = write_manifest(tmp_path / "m.txt", uris[:2])
    d = daemons(manifest=m)
    d.wait_until(settled(2))
    # Save the way editors do: write a new file and rename it over the old one.
    tmp = tmp_path / ".m.txt.swp"
    write_manifest(tmp, uris)
    os.replace(tmp, m)
    st = d.wait_until(settled(4), what="the two new entries")
    assert st["manifest_entries"] == 4
    # A broken edit keeps the previous manifest and says why.
    m.write_text("s3://bkt/ok\nnot-a-uri\n")
    wait_for(lambda: "manifest not reloaded" in d.log(), 60, "the reload error in the log")
    assert f"{m}:2:" in d.log()
    assert d.status()["manifest_entries"] == 4


def test_restart_downloads_nothing_already_verified(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 10, 100 * KiB)
    m = write_manifest(tmp_path / "m.txt", list(data))
    d = daemons(manifest=m)
    d.wait_until(settled(10))
    assert d.stop() == 0
    d2 = daemons(manifest=m)
    st = d2.wait_until(settled(10))
    assert st["requests"] == 0 and st["fetched"] == 0
    assert [Path(p).read_bytes() for p in resolve(list(data), cache_dir=d2.cache_dir)] == list(data.values())


def test_sigkill_mid_fetch_then_restart(tmp_path, s3, bucket, daemons, stalling_proxy):
    data = put_many(s3, bucket, 24, 2 * MiB)
    uris = list(data)
    # The first six objects come through; every GET of the others is held mid-body at the proxy.
    first = {f"/{bucket}/{u.split('/', 3)[3]}" for u in uris[:6]}
    stalling_proxy.plan = lambda m, p, q: (None if p in first or stalling_proxy.release.is_set()
                                           else "stall" if m == "GET" else None)
    m = write_manifest(tmp_path / "m.txt", uris)
    args = ["--workers", "4", "--part-size", "1M", "--prefetch-part-size", "1M"]
    d = daemons(manifest=m, args=args + ["--endpoint-url", stalling_proxy.url])
    d.wait_until(lambda st: st["objects"]["ready"] >= 3, what="a few files ready")
    wait_for(lambda: held_downloads(stalling_proxy, f"/{bucket}/") and not no_temp_files(d.cache_dir), 120,
             "a download in flight, its body held at the proxy")
    d.kill()
    assert not no_temp_files(d.cache_dir)  # the kill landed mid-download: a partial temp file is left
    # Whatever is visible after the kill is complete and verified.
    for uri, body in data.items():
        p = d.cache_dir / uri[5:]
        if p.exists():
            assert p.read_bytes() == body
    ready_before = {u for u in data if (d.cache_dir / u[5:]).exists()}
    assert 3 <= len(ready_before) <= 6
    stalling_proxy.release.set()
    d2 = daemons(manifest=m, args=args + ["--endpoint-url", stalling_proxy.url])
    st = d2.wait_until(settled(24))
    assert st["fetched"] == 24 - len(ready_before)  # nothing verified is fetched again
    assert no_temp_files(d2.cache_dir)
    assert [Path(p).read_bytes() for p in resolve(list(data), cache_dir=d2.cache_dir)] == list(data.values())


def test_lru_eviction_keeps_the_cache_under_max_size(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 6, 300 * KiB)
    uris = list(data)
    d = daemons(args=["--max-size", "1M", "--lease", "0"])
    for u in uris[:3]:
        resolve(u, cache_dir=d.cache_dir, timeout=120)
    resolve(uris[0], cache_dir=d.cache_dir)  # uris[1] is now the least recently used
    d.wait_until(lambda st: st["bytes"]["ready"] == 900 * KiB)
    resolve(uris[3], cache_dir=d.cache_dir, timeout=120)
    st = d.status()
    assert st["bytes"]["ready"] <= 1 * MiB
    assert st["evicted"] >= 1
    assert not (d.cache_dir / uris[1][5:]).exists()
    assert (d.cache_dir / uris[0][5:]).exists()
    for u in uris[4:]:
        assert Path(resolve(u, cache_dir=d.cache_dir, timeout=120)).read_bytes() == data[u]
        assert d.status()["bytes"]["ready"] <= 1 * MiB


def test_unread_prefetched_files_are_not_evicted_for_later_entries(tmp_path, s3, bucket, daemons):
    data = put_many(s3, bucket, 5, 300 * KiB)
    uris = list(data)
    m = write_manifest(tmp_path / "m.txt", uris)
    d = daemons(manifest=m, args=["--max-size", "1M", "--lease", "2", "--workers", "2"])
    # Two workers may land entry 3 before entry 2; then 3 gives way to 2 (an earlier entry), never the
    # other way round, and prefetch settles on the first three.
    first_three = lambda: all((d.cache_dir / u[5:]).exists() for u in uris[:3])  # noqa: E731
    st = d.wait_until(lambda st: st["prefetch_paused"] and st["objects"]["fetching"] == 0 and first_three(),
                      what="prefetch to pause on a full cache holding the first three entries")
    assert st["objects"]["ready"] == 3
    assert not any((d.cache_dir / u[5:]).exists() for u in uris[3:])
    # Once read and out of their lease, the first files may go: prefetch resumes and finishes.
    for u in uris:
        assert Path(resolve(u, cache_dir=d.cache_dir, timeout=120)).read_bytes() == data[u]
    st = d.wait_until(lambda st: st["evicted"] >= 2, what="files read to be evicted for the rest")
    assert st["bytes"]["ready"] <= MiB


def test_hostile_keys_stay_inside_the_cache_dir(tmp_path, s3, bucket, daemons):
    keys = ["../../etc/passwd", "a/../../../escape", "/abs/path", "back\\slash", "a", "a/b", "ctl\x01chars"]
    bodies = {k: os.urandom(100) for k in keys}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{quote(k, safe='/')}" for k in keys])
    d = daemons(manifest=m)
    d.wait_until(settled(len(keys)))
    root = os.path.realpath(d.cache_dir)
    for k, b in bodies.items():
        p = resolve(f"s3://{bucket}/{k}", cache_dir=d.cache_dir)
        assert os.path.realpath(p).startswith(root + os.sep)
        assert Path(p).read_bytes() == b
    for dirpath, _, filenames in os.walk(d.cache_dir):
        for name in filenames:
            assert os.path.realpath(os.path.join(dirpath, name)).startswith(root + os.sep)
    assert not any((base / name).exists() for base in (tmp_path, tmp_path.parent, d.cache_dir)
                   for name in ("etc", "escape", "abs"))


def test_private_state_is_not_world_writable_and_secrets_stay_out(tmp_path, s3, bucket, daemons):
    secret = "sEcReT-" + os.urandom(8).hex()
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/k", f"s3://{bucket}/missing"])
    d = daemons(manifest=m, args=["--log-level", "debug"], env={"AWS_SECRET_ACCESS_KEY": secret})
    st = d.wait_until(lambda st: st["objects"]["ready"] == 1 and st["objects"]["failed"] == 1)
    for dirpath, dirnames, filenames in os.walk(d.cache_dir):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert not mode & stat.S_IWOTH, os.path.join(dirpath, name)
    priv = d.cache_dir / ".s3cache"
    assert stat.S_IMODE(os.stat(priv / "tmp").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(priv / "index").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(priv / "ctl.sock").st_mode) == 0o660
    assert secret not in d.log()
    assert secret not in json.dumps(st)
    assert "testing" not in json.dumps(st)  # nor the access key id
