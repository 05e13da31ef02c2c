"""Start-up: from exec of ``s3cache serve`` (empty cache, a one-line manifest) to its first GET on the
wire, seen at the proxy; and the modules that cost the most to import on that path.

    python -m bench.startup [--runs 7] [--top 12]

The clock starts just before the exec and stops at the first request the proxy receives (the proxy
runs in this process and stamps requests as they arrive), so interpreter start-up, imports, settings,
opening the cache dir and the index, and reading the manifest all count. ``-X importtime`` then runs the
same command once more and lists the slowest imports (cumulative, so a package's total shows once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s3cache.testing import FAKE_CREDENTIALS, MotoServer, wait_for
from s3cache.testing.faultproxy import FaultProxy

from .proc import compiled, cpu_seconds


def one(proxy: FaultProxy, tmp: Path, i: int, importtime: bool = False) -> tuple[float, float, str]:
    """(seconds from exec to the first GET, the daemon's CPU-s when the bench saw it, stderr)."""
    manifest = tmp / f"m{i}.txt"
    manifest.write_text("s3://bench/first.bin\n")
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "s3cache", "serve",
           "--cache-dir", str(tmp / f"cache{i}"), "--endpoint-url", proxy.url, "--manifest", str(manifest),
           "--max-size", "1G", "--min-free", "0"]
    before = proxy.total()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **FAKE_CREDENTIALS}, start_new_session=True)
    try:
        wait_for(lambda: proxy.total() > before or proc.poll() is not None, 60, "the first request", interval=0.002)
        cpu = cpu_seconds(proc.pid) if proc.poll() is None else 0.0  # a few ms late at most
        with proxy.lock:
            first = next(t for t, n in proxy.timeline if t >= t0 and n > 0)
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    return first - t0, cpu, err


def top_imports(stderr: str, n: int) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the slowest top-level imports in ``-X importtime`` output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum_us, name = line[len("import time:"):].split("|", 2)
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # two spaces per level of nesting
        if depth == 0:  # what the program itself imports (children are in the cumulative figure)
            rows.append((int(cum_us), name.strip()))
    return sorted(rows, reverse=True)[:n]


def first_gets(moto: MotoServer, tmp: Path, runs: int = 5) -> tuple[float, float]:
    """Medians of (seconds, CPU-s) from exec to the first GET over ``runs`` starts, on a running moto."""
    compiled()
    s3 = moto.client()
    if not any(b["Name"] == "bench" for b in s3.list_buckets().get("Buckets", [])):
        s3.create_bucket(Bucket="bench")
    s3.put_object(Bucket="bench", Key="first.bin", Body=b"x" * 1000)
    with FaultProxy(moto.port) as proxy:
        got = [one(proxy, tmp, i) for i in range(runs)]
    return statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.startup")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    compiled()
    with tempfile.TemporaryDirectory(prefix="s3cache-startup-") as tmp, MotoServer() as moto:
        s3 = moto.client()
        s3.create_bucket(Bucket="bench")
        s3.put_object(Bucket="bench", Key="first.bin", Body=b"x" * 1000)
        with FaultProxy(moto.port) as proxy:
            got = [one(proxy, Path(tmp), i) for i in range(a.runs)]
            *_, err = one(proxy, Path(tmp), a.runs, importtime=True)
    times = sorted(g[0] for g in got)
    print(f"exec to first GET on the wire, empty cache: median {statistics.median(times) * 1000:.0f} ms "
          f"(min {times[0] * 1000:.0f}, max {times[-1] * 1000:.0f}, {a.runs} runs); "
          f"CPU by then: median {statistics.median(g[1] for g in got):.3f} s")
    print("slowest imports (-X importtime, cumulative, one run):")
    for us, name in top_imports(err, a.top):
        print(f"  {us / 1000:7.1f} ms  {name}")


if __name__ == "__main__":
    main()
