"""Start-up: from exec of ``s3cache serve`` (empty cache, a one-line manifest) to its first GET on the
wire, seen at the proxy, and to ready; and the modules that cost the most to import on that path.

    python -m bench.startup [--runs 7] [--top 12] [--baseline-tree DIR]

The clock starts just before the exec and stops at the first request the proxy receives (the proxy
runs in this process and stamps requests as they arrive), so interpreter start-up, imports, settings,
opening the cache dir and the index, and reading the manifest all count. The daemon's CPU-s are read
from /proc when the bench sees that request (a few ms late at most: the daemon keeps starting
meanwhile) and when its "serving" log line arrives (ready: every thread started, the sockets answer).
``-X importtime`` then runs the same command once more and lists the slowest imports (cumulative, so a
package's total shows once).

``--baseline-tree DIR`` (a checkout of another revision, e.g. main's) starts that tree's daemon in the
same rounds, alternating which of the two goes first, and prints the ratios of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from s3cache.testing import FAKE_CREDENTIALS, MotoServer, wait_for
from s3cache.testing.faultproxy import FaultProxy

from .proc import compiled


def cpu_seconds(pid: int) -> float:
    """CPU seconds ``pid``'s threads have run so far, to the nanosecond (/proc/PID/task/*/schedstat):
    /proc/PID/stat counts in 10 ms ticks, coarse for a 0.3 s start. A thread that ended is not counted
    (none ends while the daemon starts)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return total / 1e9


@dataclass
class Start:
    """One start: seconds from exec to the first GET; the daemon's CPU-s then and at ready."""

    first: float
    cpu_first: float
    cpu_ready: float


def _tree_env(tree: Path | None) -> dict[str, str]:
    """Run the daemon of ``tree`` (this checkout's when None). ``python -m`` puts the working directory
    first on sys.path, ahead of PYTHONPATH: PYTHONSAFEPATH keeps a run from a checkout from starting
    that checkout's daemon for every column."""
    if tree is None:
        import s3cache

        tree = Path(s3cache.__file__).parent.parent
    return {"PYTHONPATH": str(tree.absolute()), "PYTHONSAFEPATH": "1"}


def one(proxy: FaultProxy, tmp: Path, i: int, importtime: bool = False,
        tree: Path | None = None) -> tuple[Start, str]:
    """One start of ``serve`` on an empty cache dir: (its Start, its stderr)."""
    manifest = tmp / f"m{i}.txt"
    manifest.write_text("s3://bench/first.bin\n")
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "s3cache", "serve",
           "--cache-dir", str(tmp / f"cache{i}"), "--endpoint-url", proxy.url, "--manifest", str(manifest),
           "--max-size", "1G", "--min-free", "0"]
    before = proxy.total()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **FAKE_CREDENTIALS, **_tree_env(tree)}, start_new_session=True)
    lines: list[str] = []
    ready: list[float] = []

    def read() -> None:  # the "serving" line marks ready; CPU read the moment it arrives
        for line in proc.stderr:
            lines.append(line)
            if not ready and " serving " in line:
                ready.append(cpu_seconds(proc.pid))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: proxy.total() > before or proc.poll() is not None, 60, "the first request", interval=0.002)
        cpu_first = cpu_seconds(proc.pid) if proc.poll() is None else 0.0
        wait_for(lambda: ready or proc.poll() is not None, 60, "the serving line", interval=0.005)
        with proxy.lock:
            first = next(t for t, n in proxy.timeline if t >= t0 and n > 0)
        if proc.poll() is not None:
            reader.join(timeout=10)
            raise RuntimeError(f"serve exited with {proc.returncode}: {''.join(lines)[-2000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    return Start(first - t0, cpu_first, ready[0]), "".join(lines)


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


def _bucket(moto: MotoServer) -> None:
    s3 = moto.client()
    if not any(b["Name"] == "bench" for b in s3.list_buckets().get("Buckets", [])):
        s3.create_bucket(Bucket="bench")
    s3.put_object(Bucket="bench", Key="first.bin", Body=b"x" * 1000)


def first_gets(moto: MotoServer, tmp: Path, runs: int = 5) -> tuple[float, float]:
    """Medians of (seconds, CPU-s) from exec to the first GET over ``runs`` starts, on a running moto."""
    compiled()
    _bucket(moto)
    with FaultProxy(moto.port) as proxy:
        got = [one(proxy, tmp, i)[0] for i in range(runs)]
    return statistics.median(g.first for g in got), statistics.median(g.cpu_first for g in got)


def rounds(proxy: FaultProxy, tmp: Path, runs: int, baseline: Path | None) -> dict[str, list[Start]]:
    """``runs`` starts of this tree (and of ``baseline``'s, the two alternating which goes first)."""
    got: dict[str, list[Start]] = {"this": [], "base": []} if baseline else {"this": []}
    for r in range(runs):
        order = ["this", "base"] if baseline else ["this"]
        if r % 2:
            order.reverse()
        for who in order:
            start, _ = one(proxy, tmp, len(got["this"]) + len(got.get("base", [])),
                           tree=baseline if who == "base" else None)
            got[who].append(start)
    return got


def _line(name: str, starts: list[Start]) -> str:
    def stat(values: list[float], scale: float, fmt: str) -> str:
        v = sorted(values)
        return f"median {v[len(v) // 2] * scale:{fmt}} (min {v[0] * scale:{fmt}}, max {v[-1] * scale:{fmt}})"
    return (f"{name}: exec to first GET {stat([s.first for s in starts], 1000, '.0f')} ms; "
            f"CPU-s by then {stat([s.cpu_first for s in starts], 1, '.3f')}; "
            f"CPU-s to ready {stat([s.cpu_ready for s in starts], 1, '.3f')}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.startup")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also start this checkout's daemon, alternating with this tree's, and print ratios")
    a = ap.parse_args()
    compiled()
    if a.baseline_tree:
        compiled(a.baseline_tree / "s3cache")
    with tempfile.TemporaryDirectory(prefix="s3cache-startup-") as tmp, MotoServer() as moto:
        _bucket(moto)
        with FaultProxy(moto.port) as proxy:
            got = rounds(proxy, Path(tmp), a.runs, a.baseline_tree)
            _, err = one(proxy, Path(tmp), 2 * a.runs, importtime=True)
    print(f"{a.runs} starts each, empty cache, a one-object manifest")
    print(_line("this tree", got["this"]))
    if a.baseline_tree:
        print(_line(f"baseline {a.baseline_tree}", got["base"]))
        med = {who: {k: statistics.median(getattr(s, k) for s in starts) for k in ("first", "cpu_first", "cpu_ready")}
               for who, starts in got.items()}
        print("this / baseline (medians): " + ", ".join(
            f"{label} {med['this'][k] / med['base'][k]:.2f}"
            for k, label in (("first", "time to first GET"), ("cpu_first", "CPU-s to first GET"),
                             ("cpu_ready", "CPU-s to ready"))))
    print("slowest imports (-X importtime, cumulative, one run of this tree):")
    for us, name in top_imports(err, a.top):
        print(f"  {us / 1000:7.1f} ms  {name}")


if __name__ == "__main__":
    main()
