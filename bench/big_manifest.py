"""A manifest of 1.2 million entries (ImageNet-sized): how soon the daemon fetches, its RSS, and how
fast `status` answers. The bucket holds only the first few objects: start-up and memory are the point.

    python -m bench.big_manifest [--entries 1200000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from s3cache.config import human_size
from s3cache.testing import DaemonProcess, MotoServer, wait_for

from .proc import memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_200_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3cache-big-") as tmp, MotoServer() as moto:
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="imagenet")
        m = Path(tmp) / "m.txt"
        with open(m, "w") as f:
            for i in range(a.entries):
                cls = f"n{1440764 + i // 1300:08d}"
                f.write(f"s3://imagenet/train/{cls}/{cls}_{i:07d}.JPEG size=110000\n")
        first = [f"train/n{1440764:08d}/n{1440764:08d}_{i:07d}.JPEG" for i in range(20)]
        for k in first:
            s3.put_object(Bucket="imagenet", Key=k, Body=b"\xff" * 110000)
        t0 = time.monotonic()
        d = DaemonProcess(Path(tmp) / "cache", moto.url, manifest=m, args=["--max-size", "1T", "--min-free", "0"])
        d.start(wait=False)
        try:
            wait_for(d._ready, 600, "the daemon to serve")
            serving = time.monotonic() - t0
            d.wait_until(lambda st: st["objects"]["ready"] >= 1, timeout=600)
            first_ready = time.monotonic() - t0
            lat = []
            for _ in range(5):
                t = time.monotonic()
                d.status()
                lat.append(time.monotonic() - t)
            peak, now = memory(d.proc.pid, "VmHWM"), memory(d.proc.pid)
        finally:
            d.stop()
    print(f"manifest of {a.entries:,} entries: serving after {serving:.1f}s, first file ready after "
          f"{first_ready:.1f}s; status answers in {min(lat) * 1000:.0f}-{max(lat) * 1000:.0f} ms; "
          f"daemon RSS {human_size(now)} (peak {human_size(peak)})")


if __name__ == "__main__":
    main()
