"""Issue 15 on the real daemon: a dataset twice the cache read in a new shuffled order every epoch,
GETs counted at a proxy in front of the S3 server: without announcing the order (what any cache can do)
and with it (``iter_resolve(shuffle_seed=, epoch=)``), beside LRU's and Belady's counts for the same
trace from the simulator."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import write_manifest

from s3cache import iter_resolve
from s3cache.policy import simulate
from s3cache.policy.order import permutation

KiB = 1 << 10
N, CAP, SIZE, EPOCHS, SEED = 64, 32, 64 * KiB, 4, 11


def run(tmp_path, name, bucket, proxy, daemons, data, announce: bool) -> tuple[list[int], str]:
    uris = list(data)
    m = write_manifest(tmp_path / f"{name}.txt", uris)
    d = daemons(tmp_path / name, manifest=m,
                args=["--endpoint-url", proxy.url, "--max-size", str(CAP * SIZE), "--lease", "0",
                      "--readahead", "1f", "--workers", "4"])
    gets = []
    for epoch in range(EPOCHS):
        before = proxy.gets(f"/{bucket}/")
        if announce:
            paths = iter_resolve(uris, cache_dir=d.cache_dir, timeout=120, shuffle_seed=SEED, epoch=epoch)
        else:  # the same order, read by a reader that does not say it
            paths = iter_resolve([uris[i] for i in permutation(N, SEED, epoch)], cache_dir=d.cache_dir, timeout=120)
        order = [uris[i] for i in permutation(N, SEED, epoch)]
        for uri, p in zip(order, paths, strict=True):
            assert Path(p).read_bytes() == data[uri]
        gets.append(proxy.gets(f"/{bucket}/") - before)
    assert d.status()["bytes"]["ready"] <= CAP * SIZE
    log = d.log()
    d.stop()
    return gets, log


def test_an_announced_shuffled_order_brings_gets_down_to_beladys(tmp_path, s3, bucket, proxy, daemons):
    data = {}
    for i in range(N):
        body = os.urandom(SIZE)
        s3.put_object(Bucket=bucket, Key=f"shuf/{i:03d}", Body=body)
        data[f"s3://{bucket}/shuf/{i:03d}"] = body
    silent, silent_log = run(tmp_path, "silent", bucket, proxy, daemons, data, announce=False)
    told, told_log = run(tmp_path, "told", bucket, proxy, daemons, data, announce=True)
    assert "announced epoch" not in silent_log
    assert all(f"announced epoch {e}:" in told_log for e in range(EPOCHS))  # one message per epoch
    trace = simulate.shuffled(N, EPOCHS, SEED)
    lru = simulate.after_first_epoch(simulate.lru, trace, N, CAP).gets
    opt = simulate.after_first_epoch(simulate.belady, trace, N, CAP).gets
    print(f"GETs per epoch: without announcing {silent} ({sum(silent[1:])} in epochs 2-{EPOCHS}), "
          f"announced {told} ({sum(told[1:])}); simulator for epochs 2-{EPOCHS}: LRU {lru}, Belady {opt}")
    assert sum(told[1:]) <= 1.1 * opt, (told, opt)
