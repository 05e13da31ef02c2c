"""Never serve a wrong byte: network faults, SIGKILL at random moments, a damaged index.

Between the daemon and moto runs s3cache.testing.faultproxy, which injects faults and counts every request, so
the tests can check both what readers see and what it cost at the server.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from conftest import write_manifest
from fileevents import FileEvents

from s3cache import resolve
from s3cache.store.index import READY, Index
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy, random_plan

KiB, MiB = 1 << 10, 1 << 20


def put_objects(s3, bucket, sizes, seed=0):
    rng = random.Random(seed)
    data = {}
    for i, size in enumerate(sizes):
        key = f"d/obj-{i:03d}.bin"
        body = rng.randbytes(size)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        data[key] = body
    return data


class PublishWatcher:
    """Reads every file the moment the kernel reports it appearing in the cache (inotify, not polling)
    and compares it with the source."""

    def __init__(self, cache: Path, bucket: str, data: dict[str, bytes]) -> None:
        cache.mkdir(exist_ok=True)
        self.root = cache / bucket
        self.data = data
        self.events = FileEvents(cache, skip=lambda p: p.startswith(str(cache / ".s3cache") + os.sep))
        self.checked = 0
        self.wrong: list[str] = []

    def __enter__(self) -> PublishWatcher:
        self.events.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.events.__exit__(*exc)
        for seen in self.events.files:
            key = os.path.relpath(seen.path, self.root)
            if seen.data is None:
                self.wrong.append(f"{key} (gone before it could be read)")
                continue
            self.checked += 1
            if seen.data != self.data.get(key):
                self.wrong.append(key)


@pytest.fixture
def proxy(moto):
    p = FaultProxy(moto.port, stall_seconds=3.0).start()
    yield p
    p.stop()


@pytest.mark.parametrize("checksum", ["etag", "crc32"])
def test_network_faults_never_publish_a_wrong_byte(tmp_path, moto, s3, bucket, proxy, daemons, checksum):
    # "etag": objects as older tools wrote them, checked by MD5 (multipart ones read back in order);
    # "crc32": boto3's default CRC32, which the parts of a large object check as they stream.
    rng = random.Random(1)
    sizes = [rng.choice([0, 1, 700, 64 * KiB, 300 * KiB, MiB + 5, 3 * MiB + 11]) for _ in range(30)]
    data = put_objects(s3 if checksum == "etag" else moto.client(), bucket, sizes)
    proxy.plan = random_plan({"503": 0.10, "500": 0.05, "reset": 0.05, "short": 0.05, "flip": 0.05,
                              "stall": 0.03}, seed=2)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{k}" for k in data])
    with PublishWatcher(tmp_path / "cache", bucket, data) as watch:
        d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--part-size", "1M", "--prefetch-part-size", "1M", "--workers", "6",
                                      "--read-timeout", "1", "--max-attempts", "30"])
        st = d.wait_until(lambda st: st["objects"]["ready"] + st["objects"]["failed"] == len(data), timeout=240,
                          what="every object to land through the faults")
    assert st["objects"]["failed"] == 0, st["failures"]
    assert watch.wrong == [], f"wrong bytes published: {watch.wrong}"
    paths = resolve([f"s3://{bucket}/{k}" for k in data], cache_dir=d.cache_dir)
    assert [Path(p).read_bytes() for p in paths] == list(data.values())
    assert set(proxy.faults) == {"503", "500", "reset", "short", "flip", "stall"}, proxy.faults
    assert watch.checked >= len(data)
    assert st["verified_by"] == ({"etag-md5": len(data)} if checksum == "etag" else {"s3-crc32": len(data)})
    print(f"faults injected: {dict(proxy.faults)}; files checked as published: {watch.checked}; "
          f"requests: {proxy.total()}; retries: {st['retries']}")


def test_throttling_is_backed_off_not_stormed(tmp_path, s3, bucket, proxy, daemons):
    data = put_objects(s3, bucket, [10 * KiB] * 16)
    # S3 throttles for 3 s from the first request it sees (not from a moment the daemon may not have
    # reached yet on a slow machine).
    first: list[float] = []
    def plan(m, p, q):
        if not first:
            first.append(time.monotonic())
        return "503" if time.monotonic() < first[0] + 3.0 else None
    proxy.plan = plan
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{k}" for k in data])
    d = daemons(manifest=m, args=["--workers", "16", "--max-attempts", "30", "--endpoint-url", proxy.url])
    d.wait_until(lambda st: st["objects"]["ready"] == 16, timeout=120)
    throttled = {x.path for x in proxy.seen(f"/{bucket}/") if x.status == 503}
    # The throttle was met: every object was refused at least once, and more than one round was sent
    # into it (so backoff, not luck, kept the count down).
    assert len(throttled) == 16 and proxy.faults["503"] > 16, proxy.faults
    # 16 workers hammering for 3 s without backoff would send thousands of requests; with exponential
    # backoff shared by all workers it is a few per worker.
    assert proxy.faults["503"] <= 16 * 8, proxy.faults
    print(f"503s answered during a 3 s throttle: {proxy.faults['503']}")


def test_sigkill_at_random_moments(tmp_path, s3, bucket, proxy, daemons):
    rng = random.Random(3)
    sizes = [rng.choice([10 * KiB, 200 * KiB, 900 * KiB, 2 * MiB + 3]) for _ in range(40)]
    data = put_objects(s3, bucket, sizes, seed=4)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{k}" for k in data])
    cache = tmp_path / "cache"
    args = ["--workers", "4", "--part-size", "1M", "--prefetch-part-size", "1M", "--endpoint-url", proxy.url]
    proxy.latency = 0.01  # slow enough that kills land mid-download
    frozen: dict[str, int] = {}  # key -> GETs counted when it was first seen published
    kills = mid_download = 0
    while kills < 20:
        d = daemons(cache, manifest=m, args=args)
        started = len(proxy.seen())
        # Kill at a random point of progress: after a random number of further requests.
        target = proxy.total() + rng.randint(0, 15)
        wait_for(lambda: proxy.total() >= target or all((cache / bucket / k).exists() for k in data), 120,
                 "the daemon to make some progress")
        in_flight = [x for x in proxy.seen()[started:] if not x.done]
        d.kill()
        kills += 1
        # Landed mid-download: a GET was being answered as the kill came, and its temp file is left.
        if in_flight and os.listdir(cache / ".s3cache" / "tmp"):
            mid_download += 1
        counts = proxy.snapshot()
        for key, body in data.items():
            p = cache / bucket / key
            if p.exists():
                assert p.read_bytes() == body, f"kill {kills}: {key} visible but wrong"
                frozen.setdefault(key, counts[("GET", f"/{bucket}/{key}")])
    assert mid_download > 0, "no kill landed while a download was in flight"
    proxy.latency = 0.0
    d = daemons(cache, manifest=m, args=args)
    d.wait_until(lambda st: st["objects"]["ready"] == len(data), timeout=240)
    d.stop()
    final = proxy.snapshot()
    refetched = [k for k, n in frozen.items() if final[("GET", f"/{bucket}/{k}")] != n]
    assert refetched == [], f"verified files fetched again after a restart: {refetched}"
    assert os.listdir(cache / ".s3cache" / "tmp") == []
    for key, body in data.items():
        assert (cache / bucket / key).read_bytes() == body
    # The index agrees with the disk: one ready row per file, each row's file present with its size.
    idx = Index(str(cache / ".s3cache" / "index"))
    try:
        rows = dict(idx.items())
    finally:
        idx.close()
    assert {u for u in rows} == {f"s3://{bucket}/{k}" for k in data}
    for uri, rec in rows.items():
        assert rec.state == READY
        assert (cache / rec.path).stat().st_size == rec.size
    print(f"kills survived: {kills} ({mid_download} mid-download); files visible before the end: {len(frozen)}; "
          f"GETs: {sum(n for (mth, _), n in final.items() if mth == 'GET')} for {len(data)} objects")


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_a_damaged_index_is_rebuilt_from_the_disk(tmp_path, s3, bucket, proxy, daemons, damage):
    data = put_objects(s3, bucket, [50 * KiB] * 6 + [2 * MiB], seed=5)
    keys = list(data)
    lines = [f"s3://{bucket}/{k}" for k in keys]
    m = write_manifest(tmp_path / "m.txt", lines)
    args = ["--endpoint-url", proxy.url, "--part-size", "1M", "--prefetch-part-size", "1M"]
    d = daemons(manifest=m, args=args)
    d.wait_until(lambda st: st["objects"]["ready"] == len(data))
    d.stop()
    db = tmp_path / "cache" / ".s3cache" / "index" / "cache.db"
    if damage == "garble":
        raw = bytearray(db.read_bytes())
        for i in range(0, len(raw), 97):
            raw[i] ^= 0xFF
        db.write_bytes(bytes(raw))
    elif damage == "truncate":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 3)
    else:
        for f in db.parent.iterdir():
            f.unlink()
    # A file corrupted on disk meanwhile must not be trusted by the rebuild.
    bad = tmp_path / "cache" / bucket / keys[0]
    raw = bytearray(bad.read_bytes())
    raw[100] ^= 1
    bad.write_bytes(bytes(raw))
    gets_before = proxy.gets()
    d2 = daemons(manifest=m, args=args)
    st = d2.wait_until(lambda st: st["objects"]["ready"] == len(data))
    assert "rebuilt the index" in d2.log()
    assert proxy.gets() - gets_before == 1, "only the corrupted file is fetched again"
    assert [Path(p).read_bytes() for p in resolve([f"s3://{bucket}/{k}" for k in keys],
                                                  cache_dir=d2.cache_dir)] == list(data.values())
    assert st["verified_by"].get("size", 0) == 0


def test_connections_are_kept_alive_across_small_objects(tmp_path, s3, bucket, proxy, daemons):
    data = put_objects(s3, bucket, [20 * KiB] * 60, seed=9)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{k}" for k in data])
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--workers", "4"])
    d.wait_until(lambda st: st["objects"]["ready"] == 60)
    # moto closes every connection; the proxy keeps the daemon's side alive as S3 would, so this
    # counts the daemon's own connection handling: a handful for 60 objects, not one each.
    assert proxy.connections <= 4 * 2 + 4, proxy.connections
