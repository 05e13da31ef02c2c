"""The cold-epoch matrix: per-connection bandwidth x object size, every contender on the same number of
connections, through the latency proxy, medians of interleaved rounds.

    python -m bench --matrix [--quick] [--repeat 3] [--workers 16] [--cells 8:16M,80:1M] [--out FILE]

Cells: per-connection bandwidth {8 MB/s, 80 MB/s} x object size {1 MiB, 16 MiB, 256 MiB} (fewer objects
for the larger sizes), ``--latency`` (20 ms) added before every answer. Objects are TFRecord shards of
tf.train.Example records, uploaded as boto3 does (with a CRC32). Contenders, each on ``--workers``
connections (one round runs them all, in this order, so drift hits each alike):

* plain: boto3 threads, each object to a file (tmp + rename), objects larger than a fair share of the
  dataset per connection in ranged parts (as a transfer manager would) -- the plain client's CPU/GB;
* one object: the first object alone in parallel ranged parts -- what a first record could cost;
* pipelined ceiling: plain's download with TensorFlow reading each file as soon as it lands (no
  verification, no index) -- on 2 cores the download and the parse share the CPU, so this, not the
  download alone, is what no cache can beat here;
* s3cache running: the daemon already up (idle), the job's manifest arriving, s3cache.tf.files;
* s3cache with the job: the daemon exec'd when the job starts (its start-up counts).

Besides time, the proxy reports how many connections streamed bytes in each 100 ms (``streaming``),
which does not depend on CPU load: a cold epoch that keeps its connections busy averages close to
``--workers``. Goals per cell (issue 12): cold epoch >= 0.85x the pipelined ceiling with the daemon
started with the job, >= 0.9x with it running; first record <= 1.5x (one object + the daemon's
start-up); daemon CPU per GB <= 1.2x plain's.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from s3cache.service.config import human_size
from s3cache.testing import DaemonProcess, MotoServer

from .epoch import timed_epoch
from .proc import cpu_seconds

MiB = 1 << 20
RECORD = 100 << 10
FULL = {1 * MiB: 192, 16 * MiB: 32, 256 * MiB: 3}
QUICK = {1 * MiB: 64, 16 * MiB: 16, 256 * MiB: 1}
BANDWIDTHS = (8_000_000, 80_000_000)
FIRST_FILES = len(os.sched_getaffinity(0)) + 1  # TFRecordDataset with AUTOTUNE takes this many before its first record
CONTENDERS = ("plain", "one object", "pipelined ceiling", "s3cache running", "s3cache with the job")


class Proxy:
    """The latency proxy in its own process (its CPU is nobody's); ``stats`` and ``links`` read it."""

    def __init__(self, upstream_port: int, latency: float, bandwidth: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "s3cache.testing.faultproxy", str(upstream_port),
                                      str(latency), str(bandwidth), "stats"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def links(self, t0: float, t1: float) -> dict:
        return self.ask(f"links {t0} {t1}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@dataclass
class Sample:
    seconds: float
    ttfr: float = float("nan")
    cpu: float = float("nan")
    streaming: float = 0.0  # mean connections streaming bytes over the run
    gets: int = 0
    startup: float = float("nan")
    timeline: list = field(default_factory=list)  # connections streaming, per 100 ms
    # the first FIRST_FILES objects: (first GET sent, last answer done) in seconds from the round's start
    first_files: list = field(default_factory=list)


@dataclass
class Cell:
    bandwidth: int
    size: int
    count: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.bandwidth // 1_000_000} MB/s x {human_size(self.size)}"

    @property
    def total(self) -> int:
        return self.size * self.count

    def med(self, who: str, attr: str) -> float:
        vals = [getattr(s, attr) for s in self.samples.get(who, [])]
        vals = [v for v in vals if v == v]
        return statistics.median(vals) if vals else float("nan")

    def spread(self, who: str) -> tuple[float, float]:
        speeds = [self.total / s.seconds / 1e6 for s in self.samples.get(who, [])]
        return (min(speeds), max(speeds)) if speeds else (float("nan"), float("nan"))


def make_shard(path: Path, size: int) -> None:
    """One TFRecord file of about ``size`` bytes of Examples (an id and a random payload)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(size)
    per = max(1, size // (RECORD + 64))
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in range(per):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[r])),
                "payload": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rng.bytes(RECORD)])),
            }))
            w.write(ex.SerializeToString())


class Matrix:
    def __init__(self, a, tmp: Path, moto: MotoServer) -> None:
        import boto3  # noqa: F401 (fail early)

        self.a, self.tmp, self.moto = a, tmp, moto
        self.n = a.workers
        self.sizes: dict[int, int] = {}  # object size -> exact bytes of its shard
        self.keys: dict[int, list[str]] = {}

    def upload(self, sizes: dict[int, int]) -> None:
        s3 = self.moto.client()
        s3.create_bucket(Bucket="bench")
        for size, count in sizes.items():
            shard = self.tmp / f"shard-{size}.tfrecord"
            make_shard(shard, size)
            body = shard.read_bytes()
            shard.unlink()
            self.sizes[size] = len(body)
            self.keys[size] = [f"s{size >> 20}m/shard-{i:05d}.tfrecord" for i in range(count)]
            for k in self.keys[size]:
                s3.put_object(Bucket="bench", Key=k, Body=body)

    def client(self, url: str):
        import boto3
        import botocore.config

        return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing",
                            config=botocore.config.Config(max_pool_connections=self.n))

    # -- the plain client -------------------------------------------------------------------------

    def download(self, s3, keys: list[str], size: int, out: Path, landed=None) -> None:
        """Every object to a file on ``self.n`` threads; objects in ranged parts when there are fewer
        objects than connections. ``landed(path)`` is called as each file is renamed into place."""
        part = max(MiB, -(-len(keys) * size // self.n)) if len(keys) < self.n else size
        parts = {k: [(o, min(size, o + part) - 1) for o in range(0, size, part)] for k in keys}
        left = {k: len(v) for k, v in parts.items()}
        lock = threading.Lock()
        fds = {}
        for k in keys:
            fds[k] = os.open(out / (Path(k).name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        def one(job) -> None:
            k, (lo, hi) = job
            kw = {"Range": f"bytes={lo}-{hi}"} if (lo, hi) != (0, size - 1) else {}
            body = s3.get_object(Bucket="bench", Key=k, **kw)["Body"]
            off = lo
            for chunk in iter(lambda: body.read(MiB), b""):
                os.pwrite(fds[k], chunk, off)
                off += len(chunk)
            with lock:
                left[k] -= 1
                done = left[k] == 0
            if done:
                os.close(fds[k])
                os.rename(out / (Path(k).name + ".tmp"), out / Path(k).name)
                if landed is not None:
                    landed(str(out / Path(k).name))

        with ThreadPoolExecutor(self.n) as ex:
            list(ex.map(one, [(k, p) for k in keys for p in parts[k]]))

    # -- one round of one cell --------------------------------------------------------------------

    def round(self, cell: Cell, proxy: Proxy) -> None:
        import tensorflow as tf

        import s3cache.tf as s3tf

        keys, size = self.keys[cell.size], self.sizes[cell.size]
        s3 = self.client(proxy.url)
        work = self.tmp / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()

        def measure(who: str, run, cpu=None) -> Sample:
            c0 = cpu() if cpu else 0.0
            t0 = time.monotonic()
            sample = run()
            t1 = time.monotonic()
            if cpu:
                sample.cpu = cpu() - c0
            links = proxy.links(t0, t1)
            stream = links["streaming"][:-1] or [0]
            sample.streaming = statistics.mean(stream)
            sample.timeline = stream
            sample.gets = sum(1 for m, *_ in links["requests"] if m == "GET")
            sample.first_files = first_files(links["requests"], keys[:FIRST_FILES], t0)
            cell.samples.setdefault(who, []).append(sample)
            return sample

        out = work / "plain"
        out.mkdir()

        def plain() -> Sample:
            t0 = time.monotonic()
            self.download(s3, keys, size, out)
            return Sample(time.monotonic() - t0)

        measure("plain", plain, time.process_time)
        shutil.rmtree(out)
        out.mkdir()

        def one() -> Sample:
            t0 = time.monotonic()
            self.download(s3, keys[:1], size, out)  # one object: in ranged parts over every connection
            return Sample(time.monotonic() - t0)

        measure("one object", one)
        shutil.rmtree(out)
        out.mkdir()

        def pipelined() -> Sample:
            landed: queue.Queue = queue.Queue()

            def gen():
                for _ in keys:
                    yield landed.get()

            def make():
                threading.Thread(target=lambda: self.download(s3, keys, size, out, landed.put), daemon=True).start()
                return tf.data.TFRecordDataset(
                    tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((), tf.string)),
                    num_parallel_reads=tf.data.AUTOTUNE)

            _, secs, ttfr = timed_epoch(make)
            return Sample(secs, ttfr)

        measure("pipelined ceiling", pipelined)
        shutil.rmtree(out)

        uris = [f"s3://bench/{k}" for k in keys]
        args = ["--workers", str(self.n), "--max-size", str(2 * cell.total + (64 << 20)), "--min-free", "0"]

        # the daemon already running, idle; the job's manifest arrives
        manifest = work / "manifest.txt"
        manifest.write_text("")
        with DaemonProcess(work / "cache-running", proxy.url, manifest=manifest, args=args) as d:
            pid = d.proc.pid

            def running() -> Sample:
                new = work / "manifest.new"
                new.write_text("".join(f"{u}\n" for u in uris))

                def make():
                    os.replace(new, manifest)
                    return tf.data.TFRecordDataset(s3tf.files(uris, cache_dir=d.cache_dir),
                                                   num_parallel_reads=tf.data.AUTOTUNE)

                _, secs, ttfr = timed_epoch(make)
                return Sample(secs, ttfr)

            measure("s3cache running", running, lambda: cpu_seconds(pid))

        # the daemon started with the job
        manifest2 = work / "manifest2.txt"
        manifest2.write_text("".join(f"{u}\n" for u in uris))
        d = DaemonProcess(work / "cache-job", proxy.url, manifest=manifest2, args=args)
        started: list[float] = []
        try:
            def with_job() -> Sample:
                def make():
                    t = time.time()
                    d.start(wait=True)
                    started.append(time.time() - t)
                    return tf.data.TFRecordDataset(s3tf.files(uris, cache_dir=d.cache_dir),
                                                   num_parallel_reads=tf.data.AUTOTUNE)

                _, secs, ttfr = timed_epoch(make)
                return Sample(secs, ttfr, startup=started[0])

            s = measure("s3cache with the job", with_job)
            s.cpu = cpu_seconds(d.proc.pid)  # all of it: start-up included
        finally:
            d.stop()
        shutil.rmtree(work)


def first_files(requests: list, keys: list[str], t0: float) -> list[tuple[float, float]]:
    """For each key, when its first GET reached the proxy and when its last answer ended, in seconds
    after ``t0`` (monotonic: the proxy's process stamps them with the same clock). A stream cut short
    (a re-split prefetch) is not logged, so "sent" is then its first logged part's."""
    out = []
    for k in keys:
        mine = [(r[4], r[5]) for r in requests if r[0] == "GET" and r[1] == f"/bench/{k}"]
        out.append((min(s for s, _ in mine) - t0, max(e for _, e in mine) - t0) if mine else (float("nan"),) * 2)
    return out


def run(a) -> list[Cell]:
    counts = QUICK if a.quick else FULL
    cells = [Cell(bw, size, count) for bw in BANDWIDTHS for size, count in counts.items()]
    if a.cells:
        from s3cache.service.config import parse_size

        wanted = {(int(b) * 1_000_000, parse_size(s)) for b, _, s in (c.partition(":") for c in a.cells.split(","))}
        cells = [c for c in cells if (c.bandwidth, c.size) in wanted]
        counts = {size: n for size, n in counts.items() if any(c.size == size for c in cells)}
    import tempfile

    env = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(max(counts) + MiB)}  # keep every object in memory
    with tempfile.TemporaryDirectory(prefix="s3cache-matrix-") as tmp, MotoServer(env=env) as moto:
        m = Matrix(a, Path(tmp), moto)
        m.upload(counts)
        for bw in sorted({c.bandwidth for c in cells}):
            proxy = Proxy(moto.port, a.latency, bw)
            try:
                for r in range(a.repeat):
                    for cell in (c for c in cells if c.bandwidth == bw):
                        print(f"{cell.name}: round {r + 1} of {a.repeat}", file=sys.stderr, flush=True)
                        m.round(cell, proxy)
            finally:
                proxy.stop()
        for cell in cells:
            cell.size = m.sizes[cell.size]  # the shard's exact bytes, for MB/s
    return cells


def report(cells: list[Cell], a) -> str:
    lines = [
        f"Cold epoch matrix: {a.workers} connections for every contender, {a.latency * 1000:.0f} ms added "
        f"before every answer, each connection paced to the cell's bandwidth; TFRecord shards of 100 KiB "
        f"Examples with boto3's CRC32; {os.cpu_count()} cores shared; medians of {a.repeat} interleaved "
        f"round{'s' if a.repeat > 1 else ''} (MB/s range in brackets).",
        "",
        "| cell | objects | plain MB/s | pipelined ceiling MB/s | s3cache running MB/s (x ceiling) "
        "| with the job MB/s (x ceiling) | first record s: running / with job (one object s, start-up s) "
        "| CPU s/GB: plain / daemon running / with job | connections streaming: plain / running |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals: list[str] = []
    rows: list[str] = []
    for c in cells:
        mbs = {w: c.total / c.med(w, "seconds") / 1e6 for w in CONTENDERS}
        rng = {w: "({:.0f}–{:.0f})".format(*c.spread(w)) if len(c.samples.get(w, [])) > 1 else "" for w in CONTENDERS}
        gb = c.total / 1e9
        ceiling = mbs["pipelined ceiling"]
        one, start = c.med("one object", "seconds"), c.med("s3cache with the job", "startup")
        cpu = {w: c.med(w, "cpu") / gb for w in ("plain", "s3cache running", "s3cache with the job")}
        lines.append(
            f"| {c.name} | {c.count} | {mbs['plain']:.0f} {rng['plain']} | {ceiling:.0f} {rng['pipelined ceiling']} "
            f"| {mbs['s3cache running']:.0f} {rng['s3cache running']} ({mbs['s3cache running'] / ceiling:.2f}x) "
            f"| {mbs['s3cache with the job']:.0f} {rng['s3cache with the job']} "
            f"({mbs['s3cache with the job'] / ceiling:.2f}x) "
            f"| {c.med('s3cache running', 'ttfr'):.2f} / {c.med('s3cache with the job', 'ttfr'):.2f} ({one:.2f}, {start:.2f}) "
            f"| {cpu['plain']:.1f} / {cpu['s3cache running']:.1f} / {cpu['s3cache with the job']:.1f} "
            f"| {c.med('plain', 'streaming'):.1f} / {c.med('s3cache running', 'streaming'):.1f} |")
        miss = []
        if mbs["s3cache with the job"] < 0.85 * ceiling:
            miss.append(f"with the job {mbs['s3cache with the job'] / ceiling:.2f}x < 0.85x")
        if mbs["s3cache running"] < 0.9 * ceiling:
            miss.append(f"running {mbs['s3cache running'] / ceiling:.2f}x < 0.9x")
        if c.med("s3cache running", "ttfr") > 1.5 * one:
            miss.append(f"first record (running) {c.med('s3cache running', 'ttfr') / one:.2f}x one object > 1.5x")
        if c.med("s3cache with the job", "ttfr") > 1.5 * (one + start):
            miss.append(f"first record (with the job) {c.med('s3cache with the job', 'ttfr') / (one + start):.2f}x "
                        f"(one object + start-up) > 1.5x")
        if cpu["s3cache running"] > 1.2 * cpu["plain"]:
            miss.append(f"daemon CPU {cpu['s3cache running'] / cpu['plain']:.2f}x plain's > 1.2x")
        rounds = per_round(c, one, start)
        if rounds["cold spread"] > 0.15:
            miss.append(f"cold epoch spread between rounds {rounds['cold spread']:.0%} > 15%")
        if rounds["worst first record (with the job)"] > 1.5:
            miss.append(f"worst round's first record (with the job) {rounds['worst first record (with the job)']:.2f}x "
                        f"(one object + start-up) > 1.5x")
        goals.append(f"- {c.name}: " + ("all goals met" if not miss else "missed: " + "; ".join(miss)))
        rows.append(f"| {c.name} | {' '.join(f'{v:.2f}' for v in rounds['ttfr running'])} "
                    f"| {' '.join(f'{v:.2f}' for v in rounds['ttfr with the job'])} "
                    f"| {rounds['worst first record (with the job)']:.2f}x "
                    f"| {' '.join(f'{v:.0f}' for v in rounds['cold MB/s'])} | {rounds['cold spread']:.0%} |")
    return "\n".join(lines + ["", "Goals per cell:"] + goals + ["", *ROUNDS_HEAD, *rows, "", *first_files_table(cells)])


def first_files_table(cells: list[Cell]) -> list[str]:
    """What the first record waits on: per cell and s3cache contender, the medians over rounds of when
    each of the first files' GETs reached S3 and when its last byte left, beside the first record."""
    out = [(f"What the first record waits on (medians over rounds, s from the job's start): the first "
            f"{FIRST_FILES} files' first GET sent / last byte sent, at the proxy; then the first record."), "",
           "| cell | contender | " + " | ".join(f"file {i}" for i in range(FIRST_FILES)) + " | first record |",
           "|---|---|" + "---|" * FIRST_FILES + "---:|"]
    for c in cells:
        for w in ("s3cache running", "s3cache with the job"):
            ss = [s for s in c.samples.get(w, []) if len(s.first_files) == FIRST_FILES]
            if not ss:
                continue
            med = [tuple(statistics.median(s.first_files[i][j] for s in ss) for j in (0, 1)) for i in range(FIRST_FILES)]
            out.append(f"| {c.name} | {w} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in med)
                       + f" | {c.med(w, 'ttfr'):.2f} |")
    return out


ROUNDS_HEAD = [
    "Every round (the goals hold in every round, not only the median): first record s with the daemon "
    "running and started with the job, the worst round's first record with the job over (one object + "
    "start-up) of that round, the cold epoch with the job MB/s, and its spread ((max - min) / min).",
    "",
    "| cell | first record s, running | first record s, with the job | worst x | cold MB/s with the job | spread |",
    "|---|---|---|---:|---|---:|",
]


def per_round(c: Cell, one: float, start: float) -> dict:
    """Per-round figures of one cell: the first records, the worst of them against one object plus the
    start-up of the same round (the median's when a round lacks one), and the cold epoch's spread."""
    ones = [s.seconds for s in c.samples.get("one object", [])]
    job = c.samples.get("s3cache with the job", [])
    worst = max(((s.ttfr / ((ones[i] if i < len(ones) else one) + (s.startup if s.startup == s.startup else start)))
                 for i, s in enumerate(job)), default=float("nan"))
    cold = [c.total / s.seconds / 1e6 for s in job]
    return {"ttfr running": [s.ttfr for s in c.samples.get("s3cache running", [])],
            "ttfr with the job": [s.ttfr for s in job],
            "worst first record (with the job)": worst,
            "cold MB/s": cold,
            "cold spread": (max(cold) - min(cold)) / min(cold) if cold else float("nan")}


def chart(cells: list[Cell], path: Path) -> bool:
    """Cold-epoch MB/s per cell, each contender a bar (the pipelined ceiling is one of them); False
    without matplotlib (the bench extra has it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = ("plain", "pipelined ceiling", "s3cache running", "s3cache with the job")
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(shown)
    for k, w in enumerate(shown):
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, [c.total / c.med(w, "seconds") / 1e6 for c in cells], width, label=w)
    ax.set_xticks(range(len(cells)), [c.name for c in cells], fontsize=8)
    ax.set_ylabel("cold epoch MB/s")
    ax.set_title("Cold epoch by per-connection bandwidth x object size (medians)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(a) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cells = run(a)
    text = report(cells, a)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    if not chart(cells, a.out.with_suffix(".png")):
        print("(matplotlib not installed: no chart)", file=sys.stderr)
    raw = a.out.with_suffix(".json")
    raw.write_text(json.dumps([{"cell": c.name, "objects": c.count, "bytes": c.total,
                                "samples": {w: [s.__dict__ for s in ss] for w, ss in c.samples.items()}}
                               for c in cells], indent=1))
    print(f"(written to {a.out} and {raw.name})", file=sys.stderr)
