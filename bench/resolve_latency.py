"""resolve() latency on cached files, against os.stat of the same paths measured in the same run.

    python -m bench.resolve_latency [--files 10000] [--calls 20000]

Reports p50/p99 of single-URI resolve() (the hot path of a training loop), the time to resolve a list
of all files in one call, and both as ratios to plain os.stat, since these machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from s3cache import resolve
from s3cache.testing import DaemonProcess, MotoServer


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=20_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3cache-resolve-") as tmp, MotoServer() as moto:
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="bench")
        uris = []
        for i in range(a.files):
            s3.put_object(Bucket="bench", Key=f"img/{i // 1000:03d}/{i:07d}.jpg", Body=b"x" * 64)
            uris.append(f"s3://bench/img/{i // 1000:03d}/{i:07d}.jpg")
        manifest = Path(tmp) / "m.txt"
        manifest.write_text("s3://bench/img/\n")
        with DaemonProcess(Path(tmp) / "cache", moto.url, manifest=manifest, args=["--workers", "32"]) as d:
            d.wait_until(lambda st: st["objects"]["ready"] == a.files, timeout=1200)
            paths = resolve(uris, cache_dir=d.cache_dir)
            single, base = [], []
            for i in range(a.calls):
                u, p = uris[i % a.files], paths[i % a.files]
                t0 = time.perf_counter()
                os.stat(p)
                t1 = time.perf_counter()
                resolve(u, cache_dir=d.cache_dir)
                t2 = time.perf_counter()
                base.append(t1 - t0)
                single.append(t2 - t1)
            lists, list_base = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                for p in paths:
                    os.stat(p)
                t1 = time.perf_counter()
                resolve(uris, cache_dir=d.cache_dir)
                t2 = time.perf_counter()
                list_base.append(t1 - t0)
                lists.append(t2 - t1)
            st = d.wait_until(lambda st: st["hits"] >= a.calls, what="usage notes to arrive")
    us = 1e6
    print(f"resolve(one cached uri): p50 {pct(single, 50) * us:.1f} us, p99 {pct(single, 99) * us:.1f} us "
          f"(os.stat p50 {pct(base, 50) * us:.1f} us; ratio p50 {pct(single, 50) / pct(base, 50):.1f}x)")
    print(f"resolve(list of {a.files} cached uris): median {statistics.median(lists) * 1000:.1f} ms "
          f"(os.stat loop {statistics.median(list_base) * 1000:.1f} ms; "
          f"ratio {statistics.median(lists) / statistics.median(list_base):.1f}x)")
    print(f"daemon counted {st['hits']} hits, {st['misses']} misses")


if __name__ == "__main__":
    main()
