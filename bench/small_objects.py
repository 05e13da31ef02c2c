"""Many small objects: the daemon's CPU per 1,000 objects and its objects/s, against a plain boto3 client
fetching the same objects to files with the same number of threads, in the same run.

    python -m bench.small_objects [--objects 2000] [--size 128K] [--workers 16] [--latency 0] [--profile F]

With --latency (seconds, each response) both go through s3cache.testing.faultproxy, like S3's per-request delay.
With --profile, py-spy (the bench extra) samples the daemon while it fetches and writes collapsed stacks
to F, then prints the functions with the most samples (inclusive, and own), sampling only the thread that
holds the GIL: where the daemon's Python CPU goes.

The plain client writes each object to a temp file and renames it (no fsync; s3cache fsyncs every file
and, per batch, every directory, and checksums every byte: that is part of what it costs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from s3cache.service.config import parse_size
from s3cache.testing import DaemonProcess, MotoServer

from .proc import cpu_seconds


def plain_client(url: str, keys: list[str], out: Path, workers: int) -> tuple[float, float]:
    import boto3
    import botocore.config

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing",
                      config=botocore.config.Config(max_pool_connections=workers))
    out.mkdir(parents=True, exist_ok=True)

    def one(key: str) -> None:
        body = s3.get_object(Bucket="bench", Key=key)["Body"].read()
        tmp = out / (key.replace("/", "_") + ".tmp")
        tmp.write_bytes(body)
        os.rename(tmp, out / key.replace("/", "_"))

    c0, t0 = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, keys))
    return time.process_time() - c0, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--size", default="128K")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the daemon into this file")
    a = ap.parse_args()
    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(prefix="s3cache-small-") as tmp, MotoServer() as moto:
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="bench")
        keys = [f"img/{i // 1000:03d}/{i:07d}.jpg" for i in range(a.objects)]
        rnd = os.urandom(size * 2)
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda ik: s3.put_object(Bucket="bench", Key=ik[1],
                                                  Body=rnd[ik[0] % size: ik[0] % size + size]), enumerate(keys)))
        # The proxy runs in its own process, so its CPU is counted against neither side.
        proxy = None
        url = moto.url
        if a.latency:
            proxy = subprocess.Popen([sys.executable, "-m", "s3cache.testing.faultproxy", str(moto.port), str(a.latency)],
                                     stdout=subprocess.PIPE, text=True)
            url = f"http://127.0.0.1:{proxy.stdout.readline().strip()}"
        try:
            base_cpu, base_wall = plain_client(url, keys, Path(tmp) / "plain", a.workers)
            manifest = Path(tmp) / "m.txt"
            manifest.write_text("")
            with DaemonProcess(Path(tmp) / "cache", url, manifest=manifest,
                               args=["--workers", str(a.workers), "--max-size", "100G", "--min-free", "0"]) as d:
                spy = None
                if a.profile:
                    spy = subprocess.Popen(["py-spy", "record", "-p", str(d.proc.pid), "-o", str(a.profile),
                                            "--format", "raw", "-r", "250", "--threads", "--gil"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)  # py-spy attaches
                c0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
                new = Path(tmp) / "m.new"
                new.write_text("s3://bench/img/\n")
                os.replace(new, manifest)
                d.wait_until(lambda st: st["objects"]["ready"] == a.objects, timeout=3600, what="all objects")
                cpu, wall = cpu_seconds(d.proc.pid) - c0, time.monotonic() - t0
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
        finally:
            if proxy:
                proxy.terminate()
                proxy.wait()
    per_k = lambda c: 1000 * c / a.objects  # noqa: E731
    print(f"{a.objects} objects of {a.size}, {a.workers} connections"
          + (f", {a.latency * 1000:.0f} ms added per response" if a.latency else ", loopback"))
    print(f"plain boto3 client: {a.objects / base_wall:,.0f} objects/s, {per_k(base_cpu):.2f} CPU-s per 1,000 objects")
    print(f"s3cache daemon:     {a.objects / wall:,.0f} objects/s, {per_k(cpu):.2f} CPU-s per 1,000 objects "
          "(listing, verifying, fsyncs, index included)")
    print(f"ratios: objects/s {base_wall / wall:.2f}x of the plain client; CPU {cpu / base_cpu:.2f}x")
    if a.profile and a.profile.exists():
        top(a.profile)


def top(path: Path, n: int = 25) -> None:
    """The functions on most sampled stacks (inclusive) and on top of them (own), from py-spy's raw
    collapsed stacks; idle threads (waiting on a lock, a queue, select) are left out."""
    from collections import Counter

    incl, own, total = Counter(), Counter(), 0
    idle = ("wait (threading.py", "get (queue.py", "select", "_wait_for_tstate_lock", "acquire")
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f.strip() and not f.startswith("thread")]
        if not frames or any(frames[-1].startswith(i) for i in idle) or "(threading.py" in frames[-1] and "wait" in frames[-1]:
            continue
        c = int(count)
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    print(f"py-spy: {total} busy samples")
    for name, counter in (("inclusive", incl), ("own", own)):
        print(f"top {name}:")
        for f, c in counter.most_common(n):
            print(f"  {100 * c / max(1, total):5.1f}%  {f}")


if __name__ == "__main__":
    main()
