"""s3cache against what people use today, side by side in one run, on the same endpoint and dataset.

    python -m bench [--shards 32] [--shard-size 32M] [--record-size 100K] [--latency 0.02]
                    [--bandwidth 80M] [--repeat 3] [--legacy-objects] [--setup-envs] [--smoke]

Every contender reads the same TFRecord shards of tf.train.Example records from moto's S3 server through
a proxy (s3cache.testing.faultproxy, in its own process) that streams each response after ``--latency`` seconds
and paces every connection to ``--bandwidth`` bytes/s: S3's per-request delay and per-connection
throughput, which loopback alone hides. The proxy counts requests and bytes, which is what an S3 bill
shows. Records default to 100 KiB, the size of an ImageNet JPEG in its TFRecords.

Contenders:
* ceiling 1, the network side: boto3 get_object on 16 threads streamed to files;
* ceiling 2, the disk side: TFRecordDataset over local copies;
* baseline A, what people copy: tf.data from_tensor_slices(keys).map(py_function(boto3 get_object)),
  AUTOTUNE, every epoch refetching;
* baseline B: fsspec ``filecache::s3://`` (open_local, then TFRecordDataset), epochs 1 and 2;
* baseline C: tensorflow-io's ``s3://`` filesystem under TFRecordDataset;
* s3cache: the daemon already running (as under systemd), the job's manifest arriving, then
  s3cache.tf.files (cold, epoch 1) and resolve() (warm, epochs 2 and 3).
B and C run in environments of their own (``python -m bench.envs``, or ``--setup-envs`` here); without
them they are reported as not run.

Objects are uploaded as boto3 does today, with a CRC32 checksum that S3 keeps and returns: the daemon
verifies against it and botocore validates ceiling 1's GETs with it. ``--legacy-objects`` uploads
without one, as older tools did; then the daemon verifies the ETag's MD5 and ceiling 1 checks nothing.

Each contender runs ``--repeat`` times, interleaved, and the table shows medians (with the MB/s range),
because one run on a shared 2-core machine says little. Writes the table to ``--out`` (default
bench/results/local/compare.md, or compare-smoke.md with --smoke; that directory is git-ignored) and
a chart beside it when matplotlib is installed. The committed figures are regenerated on purpose only:
``python -m bench --out bench/results/compare.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from s3cache.service.config import human_size, parse_size
from s3cache.testing import DaemonProcess, MotoServer

from . import envs
from .epoch import timed_epoch
from .proc import cpu_seconds, memory

ROOT = Path(__file__).resolve().parent.parent
LOCAL_RESULTS = ROOT / "bench" / "results" / "local"  # git-ignored: a run never touches committed figures
MiB = 1 << 20
EPOCHS_B = 2  # fsspec: the download epoch and one from its cache
EPOCHS_C = 2  # tensorflow-io caches nothing: the second epoch shows it


class Proxy:
    """The latency proxy in its own process; ``stats()`` reads its counters."""

    def __init__(self, upstream_port: int, latency: float, bandwidth: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "s3cache.testing.faultproxy", str(upstream_port), str(latency),
                                      str(bandwidth), "stats"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@dataclass
class Sample:
    records: int
    seconds: float
    ttfr: float
    requests: int
    bytes: int
    cpu: float | None = None


@dataclass
class Row:
    contender: str
    samples: list[Sample] = field(default_factory=list)
    status: str = ""  # why it did not run, if it did not

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def make_dataset(out: Path, shards: int, shard_size: int, record_size: int) -> int:
    """TFRecord shards of Examples (an id and a random payload of ``record_size`` bytes); returns
    records per shard."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    per = max(1, shard_size // (record_size + 64))
    for s in range(shards):
        with tf.io.TFRecordWriter(str(out / f"shard-{s:05d}.tfrecord")) as w:
            for r in range(per):
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[s * per + r])),
                    "payload": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rng.bytes(record_size)])),
                }))
                w.write(ex.SerializeToString())
    return per


class Bench:
    """One dataset on one endpoint; each method measures one contender once and appends a Sample."""

    def __init__(self, a, tmp: Path, proxy: Proxy, keys: list[str], total: int, records: int) -> None:
        import boto3
        import botocore.config

        self.a, self.tmp, self.proxy, self.keys, self.total, self.records = a, tmp, proxy, keys, total, records
        self.uris = [f"s3://bench/{k}" for k in keys]
        self.rows: dict[str, Row] = {}
        self.one_shard: list[float] = []
        self.resolve_us: list[float] = []
        self.rss: list[int] = []
        self.client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing",
                                   config=botocore.config.Config(max_pool_connections=a.workers))

    def row(self, name: str) -> Row:
        return self.rows.setdefault(name, Row(name))

    def measure(self, name: str, run: Callable[[], tuple[int, float, float]], cpu: Callable[[], float] | None = None):
        before = self.proxy.stats()
        c0 = cpu() if cpu else 0.0
        n, secs, ttfr = run()
        c1 = cpu() if cpu else 0.0
        after = self.proxy.stats()
        self.row(name).samples.append(Sample(n, secs, ttfr, after["requests"] - before["requests"],
                                             after["bytes"] - before["bytes"], (c1 - c0) if cpu else None))

    def round(self, r: int) -> None:
        import tensorflow as tf

        work = self.tmp / f"round-{r}"
        work.mkdir()

        t = time.monotonic()
        self.client.get_object(Bucket="bench", Key=self.keys[0])["Body"].read()
        self.one_shard.append(time.monotonic() - t)

        # ceiling 1: raw parallel download to files (its records are the ones it downloaded)
        local = work / "local"
        local.mkdir()

        def dl(k: str) -> None:
            body = self.client.get_object(Bucket="bench", Key=k)["Body"]
            out = local / (Path(k).name + ".tmp")
            with open(out, "wb") as f:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    f.write(chunk)
            os.rename(out, local / Path(k).name)

        def ceiling1():
            t0 = time.monotonic()
            with ThreadPoolExecutor(self.a.workers) as ex:
                list(ex.map(dl, self.keys))
            return self.records, time.monotonic() - t0, float("nan")  # it reads no records

        self.measure("ceiling 1: boto3, 16 threads, to files", ceiling1, time.process_time)

        local_paths = [str(local / Path(k).name) for k in self.keys]
        self.measure("ceiling 2: TFRecordDataset, local files", lambda: timed_epoch(
            lambda: tf.data.TFRecordDataset(local_paths, num_parallel_reads=tf.data.AUTOTUNE)))
        shutil.rmtree(local)

        # baseline A: boto3 inside tf.data
        def fetch(key):
            return self.client.get_object(Bucket="bench", Key=key.numpy().decode())["Body"].read()

        def baseline_a():
            ds = tf.data.Dataset.from_tensor_slices(self.keys).map(
                lambda k: tf.py_function(fetch, [k], tf.string), num_parallel_calls=tf.data.AUTOTUNE)
            return _records_from_blobs(ds)

        for epoch in (1, 2):
            self.measure(f"baseline A: boto3 in tf.data, epoch {epoch}", lambda: timed_epoch(baseline_a))

        self.s3cache(work)
        self.baseline("fsspec", "baseline B: fsspec filecache", EPOCHS_B,
                      ["-m", "bench.baseline_fsspec", self.proxy.url, str(work / "fsspec-cache")])
        self.baseline("tfio", "baseline C: tensorflow-io s3://", EPOCHS_C,
                      ["-m", "bench.baseline_tfio", self.proxy.url])
        shutil.rmtree(work)

    def s3cache(self, work: Path) -> None:
        """The daemon already runs on the host (systemd), idle; the job brings its manifest and starts
        reading at once, as a training job would."""
        import tensorflow as tf

        import s3cache.tf as s3tf
        from s3cache import resolve

        manifest = work / "manifest.txt"
        manifest.write_text("")
        with DaemonProcess(work / "cache", self.proxy.url, manifest=manifest,
                           args=["--workers", str(self.a.workers), "--max-size", str(4 * self.total + (64 << 20)),
                                 "--min-free", "0",
                                 # the job reads as soon as it has written its manifest, before the daemon has
                                 # installed it: the operator allows the dataset's bucket (see the README's
                                 # demand scope)
                                 "--allow", "s3://bench/"]) as d:
            pid = d.proc.pid

            def cold():
                new = work / "manifest.new"
                new.write_text("".join(f"{u}\n" for u in self.uris))
                os.replace(new, manifest)
                out = timed_epoch(lambda: tf.data.TFRecordDataset(
                    s3tf.files(self.uris, cache_dir=d.cache_dir), num_parallel_reads=tf.data.AUTOTUNE))
                d.wait_until(lambda st: st["objects"]["ready"] == len(self.uris))
                return out

            self.measure("s3cache: epoch 1 (cold, tf.files)", cold, lambda: cpu_seconds(pid))
            for epoch in (2, 3):
                self.measure(f"s3cache: epoch {epoch} (warm, resolve)", lambda: timed_epoch(
                    lambda: tf.data.TFRecordDataset(resolve(self.uris, cache_dir=d.cache_dir),
                                                    num_parallel_reads=tf.data.AUTOTUNE)))
            self.rss.append(memory(pid, "VmHWM"))
            for i in range(2000):
                t0 = time.perf_counter()
                resolve(self.uris[i % len(self.uris)], cache_dir=d.cache_dir)
                self.resolve_us.append((time.perf_counter() - t0) * 1e6)

    def baseline(self, env: str, name: str, epochs: int, argv: list[str]) -> None:
        """A baseline in its own environment: the worker runs one epoch per line it reads on stdin and
        answers with one JSON line, so that the proxy's counters can be read between epochs."""
        python = envs.python_of(env, self.a.envs)
        if python is None:
            for e in range(1, epochs + 1):
                self.row(f"{name}, epoch {e}").status = f"not run: no environment (python -m bench.envs {env})"
            return
        proc = subprocess.Popen([str(python), *argv, str(epochs), *self.uris], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONPATH": ""})
        try:
            for e in range(1, epochs + 1):
                def epoch():
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if not line:
                        raise RuntimeError(f"{name}: the worker exited with {proc.wait()}")
                    r = json.loads(line)
                    return r["records"], r["seconds"], r["ttfr"]

                self.measure(f"{name}, epoch {e}", epoch)
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _spread(values: list[float]) -> float:
    """(max - min) / min: how far identical rounds differ."""
    return (max(values) - min(values)) / min(values) if values else float("nan")


def _records_from_blobs(blobs):
    """Baseline A's parsing: split each fetched shard into its records in memory."""
    import tensorflow as tf

    def split(blob):
        records = tf.py_function(_split_records, [blob], tf.string)
        return tf.reshape(records, [-1])

    return blobs.map(split, num_parallel_calls=tf.data.AUTOTUNE).flat_map(tf.data.Dataset.from_tensor_slices)


def _split_records(blob):
    import struct

    import tensorflow as tf

    data = blob.numpy()
    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack_from("<Q", data, i)
        out.append(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
    return tf.constant(out, dtype=tf.string)  # a plain list would be taken as several outputs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help text itself says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=_Help,
        description="s3cache against boto3, tf.data, fsspec and tensorflow-io on one endpoint and dataset: "
                    "prints a markdown table and writes it to --out.")
    ap.add_argument("--shards", type=int, default=32, help="TFRecord shards in the dataset")
    ap.add_argument("--shard-size", default="32M", help="bytes per shard (K, M, G suffixes)")
    ap.add_argument("--record-size", default="100K", help="payload bytes per tf.train.Example")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added before every S3 response")
    ap.add_argument("--bandwidth", default="80M", help="bytes/s for each connection, like one S3 connection; "
                    "0: no cap")
    ap.add_argument("--workers", type=int, default=16, help="parallel fetches (s3cache --workers, boto3 threads)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    ap.add_argument("--legacy-objects", action="store_true",
                    help="upload without an additional checksum, as tools before 2025 did")
    ap.add_argument("--envs", type=Path, default=envs.DEFAULT_DIR, help="where the baselines' venvs live")
    ap.add_argument("--setup-envs", action="store_true", help="make the baselines' venvs first if missing")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves the benchmark works")
    ap.add_argument("--matrix", action="store_true",
                    help="run the cold-epoch matrix instead (bench/matrix.py): per-connection bandwidth "
                         "{8, 80} MB/s x object size {1M, 16M, 256M}, --workers connections for every contender")
    ap.add_argument("--quick", action="store_true", help="with --matrix: fewer objects per cell (a few minutes)")
    ap.add_argument("--cells", default="", help="with --matrix: only these cells, as MBPS:SIZE,... (e.g. 8:16M)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where to write the table (and a .png chart beside it); default "
                         f"{LOCAL_RESULTS.relative_to(ROOT)}/compare.md or compare-smoke.md (git-ignored); "
                         f"bench/results/compare.md regenerates the committed figures")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    a = ap.parse_args(argv)
    if a.smoke:
        a.shards, a.shard_size, a.record_size, a.repeat = 3, "256K", "4K", 1
    if a.matrix:
        from . import matrix

        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        a.out = (a.out or LOCAL_RESULTS / ("matrix-quick.md" if a.quick else "matrix.md")).absolute()
        matrix.main(a)
        return
    if a.out is None:
        a.out = LOCAL_RESULTS / ("compare-smoke.md" if a.smoke else "compare.md")
    a.out = a.out.absolute()
    # Subprocesses (the daemon, the proxy) import the same s3cache as this process, from any directory.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if a.setup_envs:
        for name in envs.PACKAGES:
            if envs.python_of(name, a.envs) is None:
                print(f"making the {name} environment in {a.envs}", flush=True)
                envs.create(name, a.envs)

    with tempfile.TemporaryDirectory(prefix="s3cache-bench-") as tmp, MotoServer() as moto:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        per = make_dataset(tmp / "src", a.shards, parse_size(a.shard_size), parse_size(a.record_size))
        files = sorted((tmp / "src").iterdir())
        total = sum(f.stat().st_size for f in files)
        cfg = {"request_checksum_calculation": "when_required"} if a.legacy_objects else {}
        s3 = moto.client(**cfg)
        s3.create_bucket(Bucket="bench")
        keys = [f"train/{f.name}" for f in files]
        for f, k in zip(files, keys):
            s3.put_object(Bucket="bench", Key=k, Body=f.read_bytes())
        shutil.rmtree(tmp / "src")
        proxy = Proxy(moto.port, a.latency, float(parse_size(a.bandwidth)))
        try:
            bench = Bench(a, tmp, proxy, keys, total, per * a.shards)
            for r in range(a.repeat):
                print(f"round {r + 1} of {a.repeat}", file=sys.stderr, flush=True)
                bench.round(r)
        finally:
            proxy.stop()
    report(bench, a, total)


def report(b: Bench, a, total: int) -> None:
    rows = list(b.rows.values())
    ran = [r for r in rows if r.samples]
    by = {r.contender: r for r in ran}

    def mb_s(r: Row) -> float:
        return total / r.median("seconds") / 1e6

    def get(prefix: str) -> Row | None:
        return next((r for r in ran if r.contender.startswith(prefix)), None)

    c1, c2 = get("ceiling 1"), get("ceiling 2")
    base, cold = get("baseline A"), get("s3cache: epoch 1")
    warm = [r for r in ran if "warm" in r.contender]
    one_shard = statistics.median(b.one_shard)
    gb = total / 1e9
    legacy = "without additional checksums (ETag MD5 only)" if a.legacy_objects else "with boto3's default CRC32"
    cap = f", each connection paced to {human_size(parse_size(a.bandwidth))}/s" if parse_size(a.bandwidth) else ""
    lines = [
        f"Dataset: {a.shards} shards x {human_size(total / a.shards)} ({human_size(total)}, {b.records:,} "
        f"records of {human_size(parse_size(a.record_size))}), uploaded {legacy}; {a.latency * 1000:.0f} ms added "
        f"before every S3 response{cap}; {os.cpu_count()} cores; medians of {a.repeat} "
        f"round{'s' if a.repeat > 1 else ''}.",
        "",
        "| contender | MB/s (range) | records/s | first record (s) | S3 requests | MB from S3 | CPU s/GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.samples:
            lines.append(f"| {r.contender} | {r.status} | | | | | |")
            continue
        speeds = [total / s.seconds / 1e6 for s in r.samples]
        spread = f" ({min(speeds):.0f}–{max(speeds):.0f})" if len(speeds) > 1 else ""
        cpu = f"{r.median('cpu') / gb:.1f}" if r.samples[0].cpu is not None else ""
        ttfr = r.median("ttfr")
        lines.append(f"| {r.contender} | {mb_s(r):.0f}{spread} | {r.median('records') / r.median('seconds'):,.0f} | "
                     f"{'' if ttfr != ttfr else f'{ttfr:.2f}'} | {r.median('requests'):.0f} | {r.median('bytes') / 1e6:.0f} | {cpu} |")
    res = sorted(b.resolve_us)
    p50, p99 = res[len(res) // 2], res[int(len(res) * 0.99)]
    cold_cpu, c1_cpu = cold.median("cpu") / gb, c1.median("cpu") / gb
    lines += [
        "",
        "Goals (S3-like condition):",
        f"- cold epoch {mb_s(cold) / mb_s(c1):.2f}x ceiling 1 (goal >= 0.9) and "
        f"{mb_s(cold) / mb_s(base):.2f}x baseline A (goal >= 3)",
        f"- warm epochs {min(mb_s(w) for w in warm) / mb_s(c2):.2f}x ceiling 2 (goal >= 0.95), "
        f"S3 requests in warm epochs: {sum(s.requests for w in warm for s in w.samples)} (goal 0)",
        f"- first record {cold.median('ttfr'):.2f}s = {cold.median('ttfr') / one_shard:.1f}x the time to fetch one "
        f"shard ({one_shard:.2f}s; goal <= 2x)",
        f"- first record every round, s3cache cold: {' '.join(f'{s.ttfr:.2f}' for s in cold.samples)} s; "
        f"baseline A epoch 1: {' '.join(f'{s.ttfr:.2f}' for s in base.samples)} s (s3cache below it in "
        f"{sum(c.ttfr < b.ttfr for c, b in zip(cold.samples, base.samples))} of {len(cold.samples)} rounds); "
        f"cold epoch spread between rounds {_spread([total / s.seconds for s in cold.samples]):.0%}",
        f"- daemon CPU {cold_cpu:.1f} s/GB = {cold_cpu / c1_cpu:.2f}x ceiling 1's (goal <= 1.2x); "
        f"daemon peak RSS {human_size(max(b.rss))} (goal < 200 MB)",
        f"- resolve() of a cached file: p50 {p50:.1f} us, p99 {p99:.1f} us",
    ]
    for name in ("baseline B", "baseline C"):
        r = by.get(f"{name}: fsspec filecache, epoch 1") or by.get(f"{name}: tensorflow-io s3://, epoch 1")
        if r is not None:
            lines.append(f"- s3cache cold epoch {mb_s(cold) / mb_s(r):.2f}x {name}'s first epoch")
    text = "\n".join(lines)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    print(f"(written to {a.out})", file=sys.stderr)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.barh([r.contender for r in ran][::-1], [mb_s(r) for r in ran][::-1], color="#4c72b0")
    ax.set_xlabel("MB/s, median (higher is better)")
    ax.set_title(f"{a.latency * 1000:.0f} ms per S3 response{cap}, {human_size(total)} of TFRecords")
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
