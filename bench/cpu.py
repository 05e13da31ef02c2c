"""CPU per GB and per object: the daemon (after start-up, and start-up alone) against plain boto3 threads
and AWS's Common Runtime S3 client (``awscrt.s3.S3Client``), large and small objects separately, on one
moto server in one run; and what that means in cores for 10, 100 and 400 Gb/s.

    python -m bench.cpu [--large 16x16M] [--small 256x256K] [--workers 16] [--rounds 3] [--out FILE]
                        [--baseline-tree DIR] [--boto3-fsync] [--no-sizes]
    python -m bench.cpu --store-path [--small 256x256K]

Objects are uploaded as boto3 does by default (with a CRC32). Each round fetches each set with each
client, in this order, so drift hits each alike:

* boto3: a fresh client on ``--workers`` threads, ``get_object`` streamed in 1 MiB reads to a temp file,
  then renamed (no fsync). botocore validates the whole-object CRC32 as it streams (its default).
* boto3+fsync (``--boto3-fsync``): the same, with an ``fdatasync`` per file before the rename, as the
  daemon does. Without it the page cache's write-back runs in the kernel's flusher threads, on no
  process's clock: part of the daemon's per-byte excess over plain boto3 is only where that CPU is
  counted.
* crt: one ``S3Client`` (its own part splitting and connection count), each object to a temp file, then
  renamed. No checksum validation: with moto it validates nothing (it asks for the checksum in a
  header spelled in lower case, which moto ignores), so asking for it would cost a HEAD for nothing.
* daemon: ``s3cache serve`` started on an empty manifest (its start-up CPU is that until it is ready),
  then the set's URIs arrive in the manifest, with their sizes (as a prefix listing gives them, so a
  small object is one CRT GET unless ``--transport botocore``); CPU from then until every object is
  ready: GETs, the checksum checked, the local CRC32C, fsync of file and directory, the index, status
  -- all of it. Its peak RSS (VmHWM) over the run is reported beside it. With ``--no-sizes`` the
  manifest lists plain URIs (as tf.data jobs write them): each object's size is learned from its first
  answer (through the CRT, a ranged GET of its first 2 MiB, unless ``--transport botocore``).

With ``--botocore``, a column ``daemon@botocore`` runs this tree's daemon with ``--transport botocore``
(every object through botocore, no CRT), in the same way: what the CRT path alone changes.

With ``--baseline-tree DIR`` (a checkout of another revision), a second daemon column ``daemon@base``
runs that tree's daemon (``PYTHONPATH=DIR``) beside this tree's in every round, the two swapping places
every other round (the second of two daemon runs costs more: use an even ``--rounds``): a before/after
comparison on one moto, under the same load, interleaved so drift hits both alike.

``--store-path`` measures only the daemon's local steps per object, no network, in this process, by
batch size: the temp file (create, preallocate, write, fdatasync), ``plan``, the ``publishing`` intent
transaction, rename and directory fsync, the ``ready`` transaction: what the publisher's batching buys.

CPU is the process's user + system time (every thread, native ones included); the bench process does
nothing else while boto3 or the CRT run in it. The median of ``--rounds`` is reported, with ratios
against boto3 in the same run. Start-up to the first GET (CPU and wall) comes from ``bench.startup``.

The cores table: cores = (rate in GB/s) x (CPU-s per GB measured at that object size). On loopback there
is no TLS: over HTTPS each client pays the cipher on top (AES-GCM, roughly 0.2-0.4 CPU-s per GB with
AES-NI), the same for all three.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from s3cache.service.config import human_size, parse_size
from s3cache.store.paths import PRIVATE_DIR
from s3cache.testing import FAKE_CREDENTIALS, DaemonProcess, MotoServer, wait_for

from .proc import compiled, cpu_seconds, memory

GB = 1e9
RATES_GBIT = (10, 100, 400)


@dataclass
class ObjSet:
    name: str
    count: int
    size: int
    keys: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.count * self.size


@dataclass
class Run:
    cpu: float
    wall: float
    requests: int = 0
    rss: int = 0  # the daemon's peak RSS (VmHWM), bytes; 0 for the clients run in this process


def parse_set(name: str, text: str) -> ObjSet:
    count, _, size = text.partition("x")
    return ObjSet(name, int(count), parse_size(size))


def upload(moto: MotoServer, sets: list[ObjSet]) -> None:
    s3 = moto.client()
    s3.create_bucket(Bucket="bench")
    for s in sets:
        s.keys = [f"{s.name}/{i:05d}.bin" for i in range(s.count)]
        rnd = os.urandom(s.size + 4096)

        def put(ik: tuple[int, str], rnd: bytes = rnd, size: int = s.size) -> None:
            i, key = ik
            s3.put_object(Bucket="bench", Key=key, Body=rnd[i % 4096:][:size])  # no two objects alike

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(put, enumerate(s.keys)))


def boto3_run(url: str, s: ObjSet, out: Path, workers: int, fsync: bool = False) -> Run:
    import boto3
    import botocore.config

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing",
                      config=botocore.config.Config(max_pool_connections=workers))

    def one(key: str) -> None:
        body = s3.get_object(Bucket="bench", Key=key)["Body"]
        name = out / key.replace("/", "_")
        with open(f"{name}.tmp", "wb") as f:
            while chunk := body.read(1 << 20):
                f.write(chunk)
            if fsync:
                f.flush()
                os.fdatasync(f.fileno())
        os.rename(f"{name}.tmp", name)

    c0, t0 = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, s.keys))
    return Run(time.process_time() - c0, time.monotonic() - t0, len(s.keys))


class Crt:
    """One awscrt S3Client against the endpoint, plain HTTP, signed with the fake credentials."""

    def __init__(self, port: int) -> None:
        from awscrt.auth import AwsCredentialsProvider
        from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
        from awscrt.s3 import S3Client, S3RequestTlsMode

        self.host = f"127.0.0.1:{port}"
        elg = EventLoopGroup()
        bootstrap = ClientBootstrap(elg, DefaultHostResolver(elg))
        creds = AwsCredentialsProvider.new_static(FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                  FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        self.client = S3Client(bootstrap=bootstrap, region="us-east-1", credential_provider=creds,
                               tls_mode=S3RequestTlsMode.DISABLED, throughput_target_gbps=10)

    def run(self, s: ObjSet, out: Path) -> Run:
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        done: list = []
        lock = threading.Lock()
        all_done = threading.Event()
        keep = []

        def finished(name: Path, **kw) -> None:
            if kw.get("error") is None:
                os.rename(f"{name}.tmp", name)
            with lock:
                done.append(kw.get("error"))
                if len(done) == len(s.keys):
                    all_done.set()

        c0, t0 = time.process_time(), time.monotonic()
        for key in s.keys:
            name = out / key.replace("/", "_")
            req = HttpRequest("GET", f"/bench/{key}", HttpHeaders([("Host", self.host)]))
            keep.append(self.client.make_request(type=S3RequestType.GET_OBJECT, request=req,
                                                 recv_filepath=f"{name}.tmp",
                                                 on_done=lambda name=name, **kw: finished(name, **kw)))
        if not all_done.wait(600):
            raise RuntimeError("the CRT did not finish in 600 s")
        errors = [e for e in done if e is not None]
        if errors:
            raise RuntimeError(f"the CRT failed {len(errors)} objects: {errors[0]!r}")
        return Run(time.process_time() - c0, time.monotonic() - t0)


def daemon_run(url: str, s: ObjSet, tmp: Path, workers: int, tree: Path | None = None,
               extra: tuple[str, ...] = (), sizes: bool = True) -> tuple[Run, float]:
    """(the set's fetch after start-up, start-up CPU-s until ready on an empty manifest). ``tree``: run
    the daemon of that source tree instead of this one; ``extra``: more flags for it; ``sizes``: the
    manifest's lines carry size= (else plain URIs)."""
    manifest = tmp / "manifest.txt"
    manifest.write_text("")
    if tree is None:
        import s3cache

        tree = Path(s3cache.__file__).parent.parent
    # ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH: without
    # PYTHONSAFEPATH a bench run from a checkout would start that checkout's daemon for every column.
    env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
    with DaemonProcess(tmp / "cache", url, manifest=manifest, env=env,
                       args=["--workers", str(workers), "--max-size", str(2 * s.total + (256 << 20)),
                             "--min-free", "0", *extra]) as d:
        pid = d.proc.pid
        startup = cpu_seconds(pid)  # DaemonProcess returned once it answers as ready
        before = d.status()["requests"]
        c0, t0 = cpu_seconds(pid), time.monotonic()
        new = tmp / "manifest.new"
        # With their sizes, as a listing gives them, or (--no-sizes) plain URIs, as tf.data jobs write them.
        size = f" size={s.size}" if sizes else ""
        new.write_text("".join(f"s3://bench/{k}{size}\n" for k in s.keys))
        os.replace(new, manifest)
        # Each status request is the daemon's CPU too (1-3 ms; polled every 0.2 s it was 5-15% of the
        # small set's): wait on the published files from here, then ask once or twice for the rows.
        cache = tmp / "cache"
        wait_for(lambda: _published_files(cache) >= s.count, 600, "every object's file published",
                 interval=0.02)

        def all_ready() -> dict | None:
            st = d.status()
            return st if st["objects"]["ready"] == s.count else None

        st = wait_for(all_ready, 600, "every object ready", interval=0.02)
        cpu, wall = cpu_seconds(pid) - c0, time.monotonic() - t0
        requests = st["requests"] - before
        rss = memory(pid, "VmHWM")
    return Run(cpu, wall, requests, rss), startup


def _order(whos: list[str], r: int) -> list[str]:
    """The columns' order in round ``r``: the two daemons swap places every other round. The daemon run
    right after the other one was measured 1.6-2.1x its CPU per GB with the same code in both columns
    (16 x 16 MiB, 5 rounds, the trees swapped between runs): a fixed order credits that to the baseline."""
    others = [w for w in whos if w.startswith("daemon@")]
    if r % 2 and others:
        i, j = whos.index("daemon"), whos.index(others[0])
        whos[i], whos[j] = whos[j], whos[i]
    return whos


def _published_files(cache: Path) -> int:
    """Files renamed into the cache (the private dir, with its temp files, not counted)."""
    n = 0
    for top, dirs, files in os.walk(cache):
        if top == str(cache):
            dirs[:] = [x for x in dirs if x != PRIVATE_DIR]
        n += len(files)
    return n


def _rss(runs: list[Run]) -> str:
    """The daemon's peak RSS, the most of any round ("-" for the clients measured in this process)."""
    peak = max(r.rss for r in runs)
    return f"{peak / 1e6:.0f}" if peak else "-"


def med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def split_costs(sets: list[ObjSet], results: dict, who: str) -> tuple[float, float]:
    """(CPU-s per byte, CPU-s per object) that fit both sets' medians exactly."""
    (a, b) = sets
    per_a = med(results[a.name][who], "cpu") / a.count
    per_b = med(results[b.name][who], "cpu") / b.count
    per_byte = (per_a - per_b) / (a.size - b.size)
    return per_byte, per_b - per_byte * b.size


def report(sets: list[ObjSet], results: dict, startups: list[float], first: tuple | None, rounds: int) -> str:
    lines = [(f"CPU per GB and per object, median of {rounds} rounds, straight to moto on loopback "
              f"({os.cpu_count()} cores)"), ""]
    lines.append("| objects | client | CPU-s/GB | (min-max) | ms CPU/object | x boto3 | MB/s | requests/object | "
                 "peak RSS MB |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in sets:
        base = med(results[s.name]["boto3"], "cpu") / (s.total / GB)
        for who, runs in results[s.name].items():
            cpu = med(runs, "cpu")
            per_gb = cpu / (s.total / GB)
            gets = f"{med(runs, 'requests') / s.count:.1f}" if who != "crt" else "-"  # the CRT's are its own
            lo, hi = (min(r.cpu for r in runs) / (s.total / GB), max(r.cpu for r in runs) / (s.total / GB))
            lines.append(f"| {s.count} x {human_size(s.size)} | {who} | {per_gb:.2f} | {lo:.2f}-{hi:.2f} | "
                         f"{1000 * cpu / s.count:.2f} | "
                         f"{per_gb / base:.2f} | {s.total / med(runs, 'wall') / 1e6:,.0f} | "
                         f"{gets} | {_rss(runs)} |")
    lines.append("")
    lines.append(f"daemon start-up, exec to ready on an empty manifest: median {statistics.median(startups):.2f} CPU-s")
    if first is not None:
        lines.append(f"daemon start-up, exec to its first GET (bench.startup): median {first[0] * 1000:.0f} ms wall, "
                     f"{first[1]:.2f} CPU-s")
    if len(sets) == 2 and sets[0].size != sets[1].size:
        lines.append("")
        lines.append("Split into a cost per byte and a cost per object (its requests, file, index), from the two "
                     "sets: CPU per object = per object + size x per byte:")
        lines.append("")
        lines.append("| client | CPU-s per GB (bytes) | ms CPU per object (requests) |")
        lines.append("|---|---:|---:|")
        for who in results[sets[0].name]:
            per_byte, per_object = split_costs(sets, results, who)
            lines.append(f"| {who} | {per_byte * GB:.2f} | {per_object * 1000:.2f} |")
    lines.append("")
    lines.append("Cores to fill a link, from the CPU-s per GB above (no TLS; cores = GB/s x CPU-s/GB):")
    lines.append("")
    whos = list(next(iter(results.values())).keys())
    lines.append("| objects | " + " | ".join(f"{w} @ {g} Gb/s" for g in RATES_GBIT for w in whos) + " |")
    lines.append("|---|" + "---:|" * (len(whos) * len(RATES_GBIT)))
    for s in sets:
        row = []
        for g in RATES_GBIT:
            for w in whos:
                per_gb = med(results[s.name][w], "cpu") / (s.total / GB)
                row.append(f"{g / 8 * per_gb:.1f}")
        lines.append(f"| {human_size(s.size)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu")
    ap.add_argument("--large", default="16x16M", help="COUNTxSIZE of the large set")
    ap.add_argument("--small", default="256x256K", help="COUNTxSIZE of the small set")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-crt", action="store_true")
    ap.add_argument("--no-startup", action="store_true", help="skip bench.startup's time to the first GET")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    ap.add_argument("--boto3-fsync", action="store_true",
                    help="also run boto3 with an fdatasync per file (column boto3+fsync): the write-back a "
                         "plain client leaves to the kernel's flusher threads, which no process's CPU shows")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also run the daemon of this source tree (column daemon@base), interleaved")
    ap.add_argument("--botocore", action="store_true",
                    help="also run this tree's daemon with --transport botocore (column daemon@botocore), "
                         "interleaved")
    ap.add_argument("--no-sizes", action="store_true",
                    help="the daemons' manifests list plain URIs, without size= (each size learned from "
                         "the object's first answer)")
    ap.add_argument("--store-path", action="store_true",
                    help="only the daemon's local steps per object (file, plan, index, rename), by batch size")
    a = ap.parse_args()
    sizes = not a.no_sizes
    sets = [parse_set("large", a.large), parse_set("small", a.small)]
    if a.store_path:
        from .store_path import store_path

        print(store_path(sets[1].size, max(64, sets[1].count // 64 * 64)))
        return
    compiled()
    whos = (["boto3"] + (["boto3+fsync"] if a.boto3_fsync else []) + ["crt", "daemon"]
            + (["daemon@base"] if a.baseline_tree else []) + (["daemon@botocore"] if a.botocore else []))
    if a.baseline_tree:
        compiled(a.baseline_tree / "s3cache")
    results: dict = {s.name: {w: [] for w in whos} for s in sets}
    startups: list[float] = []
    crt_note = ""
    with tempfile.TemporaryDirectory(prefix="s3cache-cpu-") as tmp, MotoServer() as moto:
        upload(moto, sets)
        crt = None
        if not a.no_crt:
            try:
                crt = Crt(moto.port)
            except ImportError as e:
                crt_note = f"(no CRT column: {e})"
        if crt is None:
            for s in sets:
                del results[s.name]["crt"]
        for r in range(a.rounds):
            for s in sets:
                work = Path(tmp) / f"r{r}-{s.name}"
                for who in _order(list(results[s.name]), r):
                    out = work / who
                    out.mkdir(parents=True)
                    # The previous contender's dirty pages are written back now, not on the next one's
                    # CPU (a write that meets a full dirty limit, or an fsync, pays for others' bytes).
                    os.sync()
                    if who == "boto3":
                        results[s.name][who].append(boto3_run(moto.url, s, out, a.workers))
                    elif who == "boto3+fsync":
                        results[s.name][who].append(boto3_run(moto.url, s, out, a.workers, fsync=True))
                    elif who == "crt":
                        results[s.name][who].append(crt.run(s, out))
                    elif who == "daemon@botocore":
                        run, _ = daemon_run(moto.url, s, out, a.workers, extra=("--transport", "botocore"),
                                            sizes=sizes)
                        results[s.name][who].append(run)
                    elif who == "daemon@base":
                        run, _ = daemon_run(moto.url, s, out, a.workers, a.baseline_tree.absolute(), sizes=sizes)
                        results[s.name][who].append(run)
                    else:
                        run, startup = daemon_run(moto.url, s, out, a.workers, sizes=sizes)
                        results[s.name][who].append(run)
                        startups.append(startup)
                    _rmtree(out)
        first = None
        if not a.no_startup:
            from .startup import first_gets

            first = first_gets(moto, Path(tmp), runs=5)
    text = report(sets, results, startups, first, a.rounds) + (f"\n\n{crt_note}" if crt_note else "")
    if not sizes:
        text += "\n\nThe daemons' manifests listed plain URIs (--no-sizes): each size learned from its first answer."
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
