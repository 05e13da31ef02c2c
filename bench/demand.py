"""Demand before prefetch: a reader's fetch of an unlisted object while the daemon is busy prefetching a
large manifest, against the same fetch on an idle daemon, in the same run.

    python -m bench.demand [--object 64M] [--runs 5] [--manifest-objects 120] [--manifest-size 8M]
                           [--workers 16] [--latency 0] [--bandwidth 0]

``--latency`` and ``--bandwidth`` put the fault proxy between the daemon and moto (seconds before each
answer, bytes/s per connection), as S3 is: e.g. ``--workers 2 --bandwidth 4M --object 4M
--manifest-size 48M --manifest-objects 10`` is a reader's small object behind prefetches that each take
12 s on their connection.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from s3cache import resolve
from s3cache.service.config import human_size, parse_size
from s3cache.testing import DaemonProcess, MotoServer
from s3cache.testing.faultproxy import FaultProxy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--object", default="64M")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--manifest-objects", type=int, default=120)
    ap.add_argument("--manifest-size", default="8M")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each answer (via the proxy)")
    ap.add_argument("--bandwidth", default="0", help="bytes/s per connection (via the proxy); 0: no cap")
    a = ap.parse_args()
    obj, msize = parse_size(a.object), parse_size(a.manifest_size)
    with tempfile.TemporaryDirectory(prefix="s3cache-demand-") as tmp, MotoServer() as moto:
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="bench")
        block = os.urandom(msize)
        for i in range(a.manifest_objects):
            s3.put_object(Bucket="bench", Key=f"train/{i:05d}", Body=block)
        demand_body = os.urandom(obj)
        for i in range(2 * a.runs):
            s3.put_object(Bucket="bench", Key=f"unlisted/{i}", Body=demand_body)
        manifest = Path(tmp) / "m.txt"
        manifest.write_text("s3://bench/train/\n")
        args = ["--max-size", "100G", "--min-free", "0", "--allow", "s3://bench/unlisted/",  # the demand
                "--workers", str(a.workers)]
        bandwidth = parse_size(a.bandwidth)
        proxy = None
        if a.latency or bandwidth:
            proxy = FaultProxy(moto.port, latency=a.latency, bandwidth=bandwidth).start()
        url = proxy.url if proxy is not None else moto.url
        try:
            results = {}
            for label, man, offset in (("idle", None, 0), ("busy prefetching", manifest, a.runs)):
                cache = Path(tmp) / f"cache-{offset}"
                with DaemonProcess(cache, url, manifest=man, args=args) as d:
                    times = []
                    if man is not None:  # prefetch under way before the reader asks
                        d.wait_until(lambda st: st["objects"]["fetching"] > 0, what="prefetch to start")
                    for i in range(a.runs):
                        if man is not None:
                            st = d.status()
                            assert st["objects"]["queued"] + st["objects"]["fetching"] > 0, "prefetch finished too soon"
                        t0 = time.monotonic()
                        resolve(f"s3://bench/unlisted/{offset + i}", cache_dir=cache, timeout=600)
                        times.append(time.monotonic() - t0)
                    results[label] = times
                    if man is not None:
                        st = d.status()
                        print(f"(while busy: {st['objects']['fetching']} fetching, {st['objects']['queued']} queued)")
        finally:
            if proxy is not None:
                proxy.stop()
    idle, busy = statistics.median(results["idle"]), statistics.median(results["busy prefetching"])
    print(f"demand fetch of an unlisted {human_size(obj)} object, p50 of {a.runs}: idle daemon {idle:.3f}s, "
          f"daemon busy prefetching {a.manifest_objects} x {human_size(msize)}: {busy:.3f}s "
          f"(busy/idle {busy / idle:.2f}x; every busy run: "
          f"{' '.join(f'{t:.2f}' for t in results['busy prefetching'])} s)")


if __name__ == "__main__":
    main()
