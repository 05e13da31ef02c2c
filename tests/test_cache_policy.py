"""The policy in the real daemon: cyclic epochs over a dataset larger than the cache, counted at the
server, and many readers with eviction running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import gets_per_epoch, put_objects, write_manifest

from s3cache.policy import simulate

KiB = 1 << 10


def test_cyclic_epochs_agree_with_the_simulator_and_reach_the_belady_bound(tmp_path, s3, bucket, proxy, daemons):
    n, cap, size = 64, 32, 64 * KiB
    data = put_objects(s3, bucket, "ds", n, size, width=3)
    uris = list(data)
    m = write_manifest(tmp_path / "m.txt", uris)
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--max-size", str(cap * size), "--lease", "0",
                                  "--readahead", "1f", "--workers", "4"])
    gets = gets_per_epoch(proxy, bucket, data, d.cache_dir)
    st = d.status()
    assert st["bytes"]["ready"] <= cap * size
    trace = simulate.cyclic(n, 3)
    sim = simulate.after_first_epoch(simulate.s3cache_policy, trace, n, cap, list(range(n)), 1)
    opt = simulate.after_first_epoch(simulate.belady, trace, n, cap)
    lru = simulate.after_first_epoch(simulate.lru, trace, n, cap)
    real = 1 - sum(gets[1:]) / (2 * n)
    print(f"GETs per epoch {gets}; hit rate in epochs 2-3: LRU {lru.hit_rate:.3f}, s3cache daemon {real:.3f} "
          f"(simulator {sim.hit_rate:.3f}), Belady {opt.hit_rate:.3f}; status epochs {st['epochs']}")
    assert real >= 0.9 * opt.hit_rate
    assert abs(sum(gets[1:]) - sim.gets) <= 4, (gets, sim.gets)  # the daemon does what the simulator says


def test_sixteen_readers_never_lose_a_leased_file_while_eviction_runs(tmp_path, s3, bucket, daemons):
    n, size = 64, 32 * KiB
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"s/{i:03d}", Body=i.to_bytes(4, "big") + os.urandom(size - 4))
    lease = 2.0
    d = daemons(args=["--max-size", str(24 * size), "--lease", str(lease), "--workers", "8"])
    script = Path(__file__).parent / "stress_reader.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(d.cache_dir), bucket, str(n), "12", str(lease),
                               str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(16)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failures = [(rc, out, err[-2000:]) for rc, out, err in results if rc != 0]
    assert not failures, failures
    st = d.status()
    assert st["evicted"] > 0 and st["bytes"]["ready"] <= 24 * size
    reopened = sum(json.loads(out)["reopened"] for _, out, _ in results)
    missed = sum(json.loads(out)["late"] for _, out, _ in results)
    print(f"16 readers, {16 * 12} resolves, {reopened} re-opens within the lease ({missed} windows missed), "
          f"{st['evicted']} evictions, 0 FileNotFoundError")
    # The point is a re-open inside the lease while eviction runs; on a machine too slow for any reader to
    # come back within half the lease, that was never tried: fail loudly rather than pass untested.
    assert reopened > 0, f"no re-open happened within the lease ({missed} came too late)"


def test_pins_keep_files_resident_until_unpinned(tmp_path, s3, bucket, daemons):
    from click.testing import CliRunner

    from s3cache import resolve
    from s3cache.cli import main

    size = 200 * KiB
    uris = []
    for i in range(10):
        s3.put_object(Bucket=bucket, Key=f"p/{i}", Body=os.urandom(size))
        uris.append(f"s3://{bucket}/p/{i}")
    m = write_manifest(tmp_path / "m.txt", [f"{uris[0]} pin=1"])
    d = daemons(manifest=m, args=["--max-size", str(5 * size), "--lease", "0"])
    r = CliRunner().invoke(main, ["pin", "--cache-dir", str(d.cache_dir), uris[1]])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"{'pinned':<15} {uris[1]}", "2 pinned in all"], r.output
    d.wait_until(lambda st: st["pinned"]["files"] == 2, what="both pinned files to land")
    for u in uris[2:] * 2:  # churn through the rest twice: the pinned two must survive
        resolve(u, cache_dir=d.cache_dir, timeout=120)
    assert (d.cache_dir / uris[0][5:]).exists() and (d.cache_dir / uris[1][5:]).exists()
    assert d.status()["evicted"] >= 8
    r = CliRunner().invoke(main, ["unpin", "--cache-dir", str(d.cache_dir), uris[1]])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"{'unpinned':<15} {uris[1]}", "1 pinned in all"], r.output
    for u in uris[2:]:
        resolve(u, cache_dir=d.cache_dir, timeout=120)
    assert not (d.cache_dir / uris[1][5:]).exists()  # released, it went like any other
    assert (d.cache_dir / uris[0][5:]).exists()  # the manifest's pin=1 still holds
    r = CliRunner().invoke(main, ["pin", "--cache-dir", str(d.cache_dir), uris[2]])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"{'pinned':<15} {uris[2]}", "2 pinned in all"], r.output
    d.wait_until(lambda st: st["pinned"]["files"] == 2)
    d.stop()
    d2 = daemons(manifest=m, args=["--max-size", str(5 * size), "--lease", "0"])
    assert d2.status()["pinned"]["files"] == 2  # `s3cache pin` survives a restart
