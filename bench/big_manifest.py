"""A manifest of 1.2 million entries (ImageNet-sized): how soon the daemon fetches, its RSS, and how
fast `status` answers. The bucket holds only the first few objects of the share: start-up and memory
are the point.

    python -m bench.big_manifest [--entries 1200000] [--shard I/N ...]
    python -m bench.big_manifest --entries 1000000 --shard 0/1 --shard 0/64
    python -m bench.big_manifest --catalog --entries 1000000 --shard 0/1 --shard 0/64

Without ``--catalog``: the real daemon (``s3cache serve --shard I/N``), once per ``--shard``, behind a
counting proxy: time to its first GET (at the proxy), to serving, to its first file ready; its RSS.

``--catalog`` measures the part of start-up that depends on the manifest alone, in a fresh process per
share: reading, parsing and holding the manifest (manifest_file.load, as a daemon does before its first
GET), then the RSS of the process holding that catalog. ``--shard`` there may be given several times.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3cache.testing import DaemonProcess, MotoServer, wait_for

from .proc import memory


def write_manifest(path: Path, entries: int) -> None:
    with open(path, "w") as f:
        for i in range(entries):
            cls = f"n{1440764 + i // 1300:08d}"
            f.write(f"s3://imagenet/train/{cls}/{cls}_{i:07d}.JPEG size=110000\n")


def catalog_child(manifest: str, shard: str) -> None:
    """In a fresh process: load the manifest as a daemon would, report time and memory as JSON."""
    from s3cache.manifest.file import load
    from s3cache.manifest.shard import parse_shard

    t0 = time.monotonic()
    loaded = load(manifest, lambda b, p: [], parse_shard(shard), seen=None, clock=lambda: time.time() + 3600)
    first = loaded.catalog.entry(0) if len(loaded.catalog) else None
    took = time.monotonic() - t0
    gc.collect()
    print(json.dumps({"shard": shard, "entries": len(loaded.catalog), "total": loaded.catalog.total,
                      "first": first.uri if first else None, "seconds": took,
                      "rss": memory(os.getpid()), "peak": memory(os.getpid(), "VmHWM")}))


def catalog_bench(entries: int, shards: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="s3cache-big-") as tmp:
        m = Path(tmp) / "m.txt"
        write_manifest(m, entries)
        base = json.loads(subprocess.run([sys.executable, "-c", "import json, os, s3cache.manifest.file; "
                                          "from bench.proc import memory; print(json.dumps(memory(os.getpid())))"],
                                         capture_output=True, text=True, check=True).stdout)
        print(f"manifest of {entries:,} entries ({os.path.getsize(m) / 2**20:.0f} MiB); a process that has "
              f"imported s3cache holds {base / 2**20:.0f} MiB\n")
        print("| shard | entries held | time to first entry (s) | RSS (MiB) | peak RSS (MiB) |")
        print("|---|---:|---:|---:|---:|")
        for shard in shards:
            out = subprocess.run([sys.executable, "-m", "bench.big_manifest", "--catalog-child", str(m), "--shard",
                                  shard], capture_output=True, text=True, check=True).stdout
            r = json.loads(out)
            print(f"| {r['shard']} | {r['entries']:,} of {r['total']:,} | {r['seconds']:.2f} | "
                  f"{r['rss'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} |")


def daemon_run(moto, tmp: Path, m: Path, entries: int, shard: str) -> dict:
    """One daemon with ``--shard shard`` over manifest ``m``: its start-up times and memory."""
    from s3cache.manifest.shard import parse_shard
    from s3cache.testing.faultproxy import FaultProxy

    s3 = moto.client(request_checksum_calculation="when_required")
    share = parse_shard(shard, environ={})
    for i in range(share.index, min(entries, share.index + 20 * share.count), share.count):
        cls = f"n{1440764 + i // 1300:08d}"  # the share's first objects: the only ones the bucket holds
        s3.put_object(Bucket="imagenet", Key=f"train/{cls}/{cls}_{i:07d}.JPEG", Body=b"\xff" * 110000)
    cache = tmp / f"cache-{shard.replace('/', '-')}"
    with FaultProxy(moto.port) as proxy:
        d = DaemonProcess(cache, proxy.url, manifest=m,
                          args=["--max-size", "1T", "--min-free", "0", "--shard", shard])
        t0 = time.monotonic()
        d.start(wait=False)
        try:
            def fetched() -> bool:
                if d.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.log()}")
                return proxy.gets("/imagenet/") > 0

            wait_for(fetched, 600, "the first GET")
            first_get = time.monotonic() - t0
            wait_for(d._ready, 600, "the daemon to serve")
            serving = time.monotonic() - t0
            st = d.wait_until(lambda st: st["objects"]["ready"] >= 1, timeout=600)
            first_ready = time.monotonic() - t0
            lat = []
            for _ in range(5):
                t = time.monotonic()
                d.status()
                lat.append(time.monotonic() - t)
            peak, now = memory(d.proc.pid, "VmHWM"), memory(d.proc.pid)
        finally:
            d.stop()
    return {"shard": shard, "entries": st["manifest_entries"], "total": st.get("manifest_total", entries),
            "first_get": first_get, "serving": serving, "first_ready": first_ready, "status_ms": min(lat) * 1000,
            "rss": now, "peak": peak}


def daemon_bench(entries: int, shards: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="s3cache-big-") as tmp, MotoServer() as moto:
        moto.client().create_bucket(Bucket="imagenet")
        m = Path(tmp) / "m.txt"
        write_manifest(m, entries)
        past = time.time() - 3600
        os.utime(m, (past, past))  # written long ago: no settle wait at start-up
        print(f"manifest of {entries:,} entries ({os.path.getsize(m) / 2**20:.0f} MiB), the real daemon per share\n")
        print("| shard | entries held | first GET (s) | serving (s) | first file ready (s) | status (ms) "
              "| RSS (MiB) | peak RSS (MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for shard in shards:
            r = daemon_run(moto, Path(tmp), m, entries, shard)
            print(f"| {r['shard']} | {r['entries']:,} of {r['total']:,} | {r['first_get']:.1f} | {r['serving']:.1f} "
                  f"| {r['first_ready']:.1f} | {r['status_ms']:.0f} | {r['rss'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.big_manifest")
    ap.add_argument("--entries", type=int, default=1_200_000, help="manifest entries (default: %(default)s)")
    ap.add_argument("--shard", action="append", default=None,
                    help="a host's share I/N (the daemon's --shard); may repeat: one run per share")
    ap.add_argument("--catalog", action="store_true", help="measure loading the manifest alone, per shard")
    ap.add_argument("--catalog-child", metavar="MANIFEST", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.catalog_child:
        return catalog_child(a.catalog_child, (a.shard or ["0/1"])[0])
    if a.catalog:
        return catalog_bench(a.entries, a.shard or ["0/1", "0/64"])
    return daemon_bench(a.entries, a.shard or ["0/1"])


if __name__ == "__main__":
    main()
