"""A fleet on one machine: S3 traffic and time for a globally shuffled job, with and without peers.

    python -m bench.fleet [--hosts 4] [--objects 64] [--size 1M] [--epochs 2] [--latency 0.02]
                          [--bandwidth 80M] [--peer-rate 500M] [--smoke]

``--hosts`` daemons on 127.0.0.1, each with its own cache dir and peer port, in front of moto's S3 server
through a counting proxy (s3cache.testing.faultproxy) that delays every answer by ``--latency`` and
paces each connection to ``--bandwidth`` bytes/s, as S3 would; the peer link is paced by the daemons'
``--peer-rate`` (bytes/s per transfer, a LAN's share). One reader per host reads its slice of a new
global permutation of the dataset each epoch (PyTorch's ``DistributedSampler.set_epoch``), checking
every byte. The same run is made without peers (every host fetches what its readers need from S3)
and with them; the table gives fleet S3 GETs (a waiting reader's object may come in ranged parts, each a
GET), S3 bytes (also as copies of the dataset), the wall time of the epochs, and the ratios against the
no-peer run of the same invocation.

``Fleet`` and ``read_epochs`` are also the harness of tests/test_peer*.py.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from s3cache.testing import DaemonProcess, MotoServer, free_port, wait_for

SECRET = "fleet-secret-for-tests-and-benchmarks-0123456789"


class Fleet:
    """``n`` daemons on 127.0.0.1 over ``endpoint``, each with its own cache dir under ``root``; with
    ``peers`` they serve each other (one secret, one host list in order, or ``members`` as --peers);
    ``sharded``: host i prefetches share i/n of the manifest.
    Always ``stop()`` it.

    They start on an empty manifest and the job's arrives with ``job(lines)`` once all serve, as under
    systemd: a host that asked a peer still starting would find it refusing and fetch from S3."""

    def __init__(self, root: Path, endpoint: str, n: int, *, peers: bool = True,
                 args: list[str] = (), peer_timeout: float = 60.0, peer_rate: int = 0,
                 members: str | None = None, sharded: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(n)]
        self.addrs = [f"127.0.0.1:{p}" for p in self.ports]
        self.secret_file = self.root / "peer-secret"
        self.secret_file.write_text(SECRET + "\n")
        os.chmod(self.secret_file, 0o600)
        self.sharded = sharded
        self.manifest = self.root / "manifest.txt"
        self.manifest.write_text("")
        self.daemons: list[DaemonProcess] = []
        for i in range(n):
            extra = list(args) + (["--shard", f"{i}/{n}"] if sharded else [])
            if peers:
                extra += ["--peers", members or ",".join(self.addrs), "--peer-addr", self.addrs[i],
                          "--peer-secret-file", str(self.secret_file), "--peer-timeout", str(peer_timeout),
                          "--peer-rate", str(peer_rate)]
            self.daemons.append(DaemonProcess(self.root / f"cache{i}", endpoint, manifest=self.manifest, args=extra,
                                              log_path=self.root / f"daemon{i}.log",
                                              env={"S3CACHE_ALLOW": "s3://"}))

    @property
    def cache_dirs(self) -> list[Path]:
        return [d.cache_dir for d in self.daemons]

    def start(self, which: list[int] | None = None) -> Fleet:
        for i in which if which is not None else range(len(self.daemons)):
            self.daemons[i].start(wait=False)
        for i in which if which is not None else range(len(self.daemons)):
            wait_for(self.daemons[i]._ready, 120, f"daemon {i} (log: {self.daemons[i].log_path})")
        return self

    def job(self, lines: list[str]) -> None:
        """The job's manifest, written whole (renamed into place) for every daemon at once; returns once
        every running daemon has installed it."""
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.manifest)
        n = len(self.daemons)
        for i, d in enumerate(self.daemons):  # readers start once every running host has it
            if d.proc is None:
                continue
            share = len(range(i, len(lines), n)) if self.sharded else len(lines)
            d.wait_until(lambda st, k=share: st["manifest_entries"] == k, 120, "the job's manifest installed")

    def stop(self) -> list[int | None]:
        return [d.stop() for d in self.daemons]

    def log_problems(self) -> list[str]:
        """Lines of the daemons' logs that say something went wrong (a traceback, an error): a test
        fleet must run and stop clean."""
        return [f"{d.log_path.name}: {line}" for d in self.daemons for line in d.log().splitlines()
                if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]

    def statuses(self) -> list[dict]:
        return [d.status() for d in self.daemons]

    def wait_all_ready(self, count: int, timeout: float = 300) -> None:
        for d in self.daemons:
            d.wait_until(lambda st: st["objects"]["ready"] >= count, timeout, f"{count} files ready")


def read_epochs(cache_dirs: list[Path], data: dict[str, bytes], epochs: int, seed: int = 0,
                timeout: float = 300) -> float:
    """One reader per cache dir; each epoch a new global permutation of ``data``'s URIs, reader ``r``
    reading positions ``r, r + N, ...`` of it (DistributedSampler). Every byte checked; raises the first
    reader's error. Returns the wall seconds of all epochs."""
    from s3cache import iter_resolve

    uris, n = list(data), len(cache_dirs)
    errors: list[BaseException] = []

    def reader(rank: int) -> None:
        try:
            for epoch in range(epochs):
                order = uris[:]
                random.Random(seed * 1000 + epoch).shuffle(order)
                mine = order[rank::n]
                for uri, path in zip(mine, iter_resolve(mine, cache_dir=cache_dirs[rank], timeout=timeout)):
                    if Path(path).read_bytes() != data[uri]:
                        raise AssertionError(f"reader {rank} read wrong bytes for {uri}")
        except BaseException as e:  # handed to the caller
            errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=reader, args=(r,), name=f"fleet-reader-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - started


def upload(s3, bucket: str, n: int, size: int, seed: int = 1,
           keep: Callable[[str], bool] = lambda uri: True) -> tuple[dict[str, bytes], list[str]]:
    """``n`` objects of ``size`` random bytes; their data, and manifest lines with size= and sha256=
    (what ``s3cache manifest --checksums`` writes): peers' bytes are then checked with no S3 request.
    ``keep(uri)``: whether to use a candidate key (tests pick keys by owner)."""
    import hashlib
    import itertools

    rng = random.Random(seed)
    data, lines = {}, []
    for i in itertools.count():
        if len(data) == n:
            break
        key = f"fleet/{i:05d}"
        uri = f"s3://{bucket}/{key}"
        if not keep(uri):
            continue
        body = rng.randbytes(size)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        data[uri] = body
        lines.append(f"{uri} size={size} sha256={hashlib.sha256(body).hexdigest()}")
    return data, lines


def run(args: argparse.Namespace) -> list[dict]:
    import tempfile

    from s3cache.service.kinds import parse_size
    from s3cache.testing.faultproxy import FaultProxy

    size, rate, bandwidth = parse_size(args.size), parse_size(args.peer_rate), parse_size(args.bandwidth)
    rows = []
    with tempfile.TemporaryDirectory(prefix="s3cache-fleet-") as tmp, MotoServer() as moto:
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="fleet")
        data, lines = upload(s3, "fleet", args.objects, size)
        for peers in (False, True):
            with FaultProxy(moto.port, latency=args.latency, bandwidth=bandwidth) as proxy:
                fleet = Fleet(Path(tmp) / ("peers" if peers else "alone"), proxy.url, args.hosts,
                              peers=peers, peer_rate=rate, args=["--workers", "4"])
                try:
                    fleet.start()
                    fleet.job(lines)
                    seconds = read_epochs(fleet.cache_dirs, data, args.epochs)
                    fleet.wait_all_ready(len(data))  # prefetch of the rest counts for the run too
                    gets, sent = proxy.gets("/fleet/"), proxy.bytes_sent
                finally:
                    codes = fleet.stop()
                if any(codes):
                    raise SystemExit(f"a daemon exited with {codes}; logs in {fleet.root}")
            rows.append({"peers": peers, "gets": gets, "bytes": sent, "seconds": seconds})
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    from s3cache.service.kinds import parse_size

    base = rows[0]
    dataset = args.objects * parse_size(args.size)
    out = [f"{args.hosts} hosts, {args.objects} objects of {args.size}, {args.epochs} epochs, global reshuffle; "
           f"S3 {args.latency * 1000:.0f} ms and {args.bandwidth}/s a connection, peers {args.peer_rate}/s",
           "", "| run | S3 GETs | GETs per object | S3 MB | copies from S3 | epochs s | S3 bytes vs alone | "
           "time vs alone |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {'peers' if r['peers'] else 'alone'} | {r['gets']} | {r['gets'] / args.objects:.2f} | "
                   f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / dataset:.2f} | {r['seconds']:.1f} | {r['bytes'] / max(base['bytes'], 1):.2f} | "
                   f"{r['seconds'] / max(base['seconds'], 1e-9):.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--objects", type=int, default=64)
    p.add_argument("--size", default="1M")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--bandwidth", default="80M", help="bytes/s of one S3 connection")
    p.add_argument("--peer-rate", default="500M", help="bytes/s of one peer transfer")
    p.add_argument("--smoke", action="store_true", help="2 hosts, 8 small objects: proves it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.hosts, args.objects, args.size = 2, 8, "64K"
    rows = run(args)
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
