"""s3cache against what people use today, side by side in one run, on the same endpoint and dataset.

    python -m bench [--shards 16] [--shard-size 16M] [--latency 0.02] [--bandwidth 80M] [--smoke]

Every contender reads the same TFRecord shards of tf.train.Example records from moto's S3 server through
a latency-adding proxy (s3cache.faultproxy, in its own process: each response waits ``--latency``
seconds, like S3's per-request delay; loopback alone flatters every approach). The proxy counts GETs
and bytes, which is what an S3 bill shows.

Contenders:
* baseline A, what people copy: tf.data from_tensor_slices(keys).map(py_function(boto3 get_object)),
  AUTOTUNE, every epoch refetching;
* ceiling 1, the network side: boto3 get_object on 16 threads streamed to files;
* ceiling 2, the disk side: TFRecordDataset over local copies;
* s3cache: the daemon plus s3cache.tf.files (cold, epoch 1) and resolve() (warm, epochs 2 and 3).
Baselines B (fsspec filecache) and C (tensorflow-io) need their own environments (s3fs pins an older
botocore; tensorflow-io needs TensorFlow 2.16) and are reported as not run.

Writes bench/results/compare.md (and compare.png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from s3cache.config import human_size, parse_size

from .proc import cpu_seconds, memory
from s3cache.testing import DaemonProcess, MotoServer

RESULTS = Path(__file__).parent / "results"
MiB = 1 << 20


class Proxy:
    """The latency proxy in its own process; ``stats()`` reads its counters."""

    def __init__(self, upstream_port: int, latency: float, bandwidth: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "s3cache.faultproxy", str(upstream_port), str(latency),
                                      str(bandwidth), "stats"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def make_dataset(out: Path, shards: int, shard_size: int) -> int:
    """TFRecord shards of Examples with a 4 KiB payload each; returns records per shard."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    per = max(1, shard_size // 4200)
    for s in range(shards):
        with tf.io.TFRecordWriter(str(out / f"shard-{s:05d}.tfrecord")) as w:
            for r in range(per):
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[s * per + r])),
                    "payload": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rng.bytes(4096)])),
                }))
                w.write(ex.SerializeToString())
    return per


def parse_count(ds) -> int:
    import tensorflow as tf

    spec = {"id": tf.io.FixedLenFeature([], tf.int64), "payload": tf.io.FixedLenFeature([], tf.string)}
    n = 0
    for b in ds.batch(256).map(lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE):
        n += int(b["id"].shape[0])
    return n


def timed_epoch(make_ds) -> tuple[int, float, float]:
    """(records, seconds, time to first record) for one pass over a fresh dataset."""
    import tensorflow as tf

    t0 = time.monotonic()
    ds = make_ds()
    first = None
    n = 0
    spec = {"id": tf.io.FixedLenFeature([], tf.int64), "payload": tf.io.FixedLenFeature([], tf.string)}
    for b in ds.batch(256).map(lambda x: tf.io.parse_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE):
        if first is None:
            first = time.monotonic() - t0
        n += int(b["id"].shape[0])
    return n, time.monotonic() - t0, first or 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--shard-size", default="16M")
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--bandwidth", default="0", help="cap each connection at this many bytes/s, like one S3 "
                    "connection (e.g. 80M); 0: no cap")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves the benchmark works")
    a = ap.parse_args()
    if a.smoke:
        a.shards, a.shard_size = 3, "256K"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import boto3
    import botocore.config
    import tensorflow as tf

    import s3cache.tf as s3tf
    from s3cache import resolve

    shard_size = parse_size(a.shard_size)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="s3cache-bench-") as tmp, MotoServer() as moto:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        per = make_dataset(tmp / "src", a.shards, shard_size)
        files = sorted((tmp / "src").iterdir())
        total = sum(f.stat().st_size for f in files)
        records = per * a.shards
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="bench")
        keys = [f"train/{f.name}" for f in files]
        for f, k in zip(files, keys):
            s3.put_object(Bucket="bench", Key=k, Body=f.read_bytes())
        proxy = Proxy(moto.port, a.latency, float(parse_size(a.bandwidth)))
        try:
            client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing",
                                  config=botocore.config.Config(max_pool_connections=a.workers))

            def row(name, n, secs, ttfr, before, after, cpu=None, note=""):
                rows.append({"contender": name, "records": n, "seconds": secs, "ttfr": ttfr,
                             "mb_s": total / secs / MiB if secs else 0, "rec_s": n / secs if secs else 0,
                             "gets": after["gets"] - before["gets"], "bytes": after["bytes"] - before["bytes"],
                             "cpu_per_gb": None if cpu is None else cpu / (total / (1 << 30)), "note": note})

            # one shard alone: the time-to-first-record reference
            t = time.monotonic()
            client.get_object(Bucket="bench", Key=keys[0])["Body"].read()
            one_shard = time.monotonic() - t

            # ceiling 1: raw parallel download to files
            local = tmp / "local"
            local.mkdir()

            def dl(k: str) -> None:
                body = client.get_object(Bucket="bench", Key=k)["Body"]
                out = local / (Path(k).name + ".tmp")
                with open(out, "wb") as f:
                    for chunk in iter(lambda: body.read(1 << 20), b""):
                        f.write(chunk)
                os.rename(out, local / Path(k).name)

            before, c0, t0 = proxy.stats(), time.process_time(), time.monotonic()
            with ThreadPoolExecutor(a.workers) as ex:
                list(ex.map(dl, keys))
            secs = time.monotonic() - t0
            row("ceiling 1: boto3, 16 threads, to files", records, secs, 0.0, before, proxy.stats(),
                cpu=time.process_time() - c0, note="download only, no parsing")

            # ceiling 2: local TFRecords
            local_paths = [str(local / Path(k).name) for k in keys]
            before = proxy.stats()
            n, secs, ttfr = timed_epoch(lambda: tf.data.TFRecordDataset(local_paths, num_parallel_reads=tf.data.AUTOTUNE))
            row("ceiling 2: TFRecordDataset, local files", n, secs, ttfr, before, proxy.stats())

            # baseline A: boto3 inside tf.data
            def fetch(key):
                return client.get_object(Bucket="bench", Key=key.numpy().decode())["Body"].read()

            def baseline_a():
                ds = tf.data.Dataset.from_tensor_slices(keys).map(
                    lambda k: tf.py_function(fetch, [k], tf.string), num_parallel_calls=tf.data.AUTOTUNE)
                return _records_from_blobs(ds)

            for epoch in (1, 2):
                before = proxy.stats()
                n, secs, ttfr = timed_epoch(baseline_a)
                row(f"baseline A: boto3 in tf.data, epoch {epoch}", n, secs, ttfr, before, proxy.stats())

            # s3cache: the daemon already runs on the host (systemd), idle; the job brings its manifest
            # and starts reading at once, as a training job would.
            manifest = tmp / "manifest.txt"
            manifest.write_text("")
            uris = [f"s3://bench/{k}" for k in keys]
            with DaemonProcess(tmp / "cache", proxy.url, manifest=manifest,
                               args=["--workers", str(a.workers), "--max-size", str(4 * total + (64 << 20)),
                                     "--min-free", "0"]) as d:
                pid = d.proc.pid
                before, c0 = proxy.stats(), cpu_seconds(pid)
                new = tmp / "manifest.new"
                new.write_text("".join(f"s3://bench/{k} size={f.stat().st_size}\n" for k, f in zip(keys, files)))
                os.replace(new, manifest)
                n, secs, ttfr = timed_epoch(lambda: tf.data.TFRecordDataset(
                    s3tf.files(uris, cache_dir=d.cache_dir), num_parallel_reads=tf.data.AUTOTUNE))
                d.wait_until(lambda st: st["objects"]["ready"] == len(uris))
                cpu = cpu_seconds(pid) - c0
                row("s3cache: epoch 1 (cold, tf.files)", n, secs, ttfr, before, proxy.stats(), cpu=cpu)
                for epoch in (2, 3):
                    before = proxy.stats()
                    n, secs, ttfr = timed_epoch(lambda: tf.data.TFRecordDataset(
                        resolve(uris, cache_dir=d.cache_dir), num_parallel_reads=tf.data.AUTOTUNE))
                    row(f"s3cache: epoch {epoch} (warm, resolve)", n, secs, ttfr, before, proxy.stats())
                rss = memory(pid, "VmHWM")
        finally:
            proxy.stop()
    report(rows, a, total, records, one_shard, rss)


def _records_from_blobs(blobs):
    """Baseline A's parsing: split each fetched shard into its records in memory."""
    import tensorflow as tf

    def split(blob):
        records = tf.py_function(_split_records, [blob], tf.string)
        return tf.reshape(records, [-1])

    return blobs.map(split, num_parallel_calls=tf.data.AUTOTUNE).flat_map(tf.data.Dataset.from_tensor_slices)


def _split_records(blob):
    import struct

    data = blob.numpy()
    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack_from("<Q", data, i)
        out.append(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
    import tensorflow as tf

    return tf.constant(out, dtype=tf.string)  # a plain list would be taken as several outputs


def report(rows: list[dict], a, total: int, records: int, one_shard: float, rss: int) -> None:
    c1 = next(r for r in rows if r["contender"].startswith("ceiling 1"))
    c2 = next(r for r in rows if r["contender"].startswith("ceiling 2"))
    base = next(r for r in rows if r["contender"].startswith("baseline A"))
    cold = next(r for r in rows if "epoch 1 (cold" in r["contender"])
    warm = [r for r in rows if "warm" in r["contender"]]
    lines = [
        f"Dataset: {a.shards} shards x {human_size(total / a.shards)} ({human_size(total)}, {records:,} records); "
        f"{a.latency * 1000:.0f} ms added to every S3 response; {os.cpu_count()} cores.",
        "",
        "| contender | MB/s | records/s | first record (s) | GETs | MB from S3 | CPU s/GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = f"{r['cpu_per_gb']:.1f}" if r["cpu_per_gb"] is not None else ""
        lines.append(f"| {r['contender']} | {r['mb_s']:.0f} | {r['rec_s']:,.0f} | {r['ttfr']:.2f} | {r['gets']} | "
                     f"{r['bytes'] / MiB:.0f} | {cpu} |")
    lines += [
        "| baseline B: fsspec filecache | not run | | | | | |",
        "| baseline C: tensorflow-io s3:// | not run | | | | | |",
        "",
        "Goals (S3-like condition):",
        f"- cold epoch {cold['mb_s'] / c1['mb_s']:.2f}x ceiling 1 (goal >= 0.9) and "
        f"{cold['mb_s'] / base['mb_s']:.2f}x baseline A (goal >= 3)",
        f"- warm epochs {min(w['mb_s'] for w in warm) / c2['mb_s']:.2f}x ceiling 2 (goal >= 0.95), "
        f"S3 requests in warm epochs: {sum(w['gets'] for w in warm)} (goal 0)",
        f"- time to first record {cold['ttfr']:.2f}s = {cold['ttfr'] / one_shard:.1f}x the time to fetch one shard "
        f"({one_shard:.2f}s; goal <= 2x)",
        f"- daemon CPU {cold['cpu_per_gb']:.1f} s/GB = {cold['cpu_per_gb'] / c1['cpu_per_gb']:.2f}x ceiling 1's "
        f"(goal <= 1.2x, and the daemon also verifies every byte); daemon peak RSS {human_size(rss)} (goal < 200 MB)",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = "compare-smoke" if a.smoke else "compare"
    (RESULTS / f"{name}.md").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([r["contender"] for r in rows][::-1], [r["mb_s"] for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("MB/s (higher is better)")
    ax.set_title(f"{a.latency * 1000:.0f} ms per S3 response, {human_size(total)} of TFRecords")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
