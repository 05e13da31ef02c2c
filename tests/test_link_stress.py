"""A promoted prefetch must not deadlock the link, shown end to end: the real daemon, a small cache, a
link that more connections cannot widen, and readers that keep catching up with prefetch (so their wants
promote prefetches mid-stream while the link is judged saturated). The unit tests of the rules are in
test_link.py; this is the stress they exist for. With link.py's two rules undone (a promoted prefetch
stops waiting for prefetch's turn; an idle window ends a "limited" verdict) the readers hang here: a
ResolveTimeout with every download in flight at 0.0 MB/s."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from conftest import put_objects, write_manifest

from s3cache import iter_resolve, resolve
from s3cache.testing.faultproxy import FaultProxy

KiB, MiB = 1 << 10, 1 << 20
FILES = 60
SIZE = 256 * KiB  # 60 files of 256 KiB: 15 MiB through an 8 MiB cache, so prefetch keeps waiting for room
READERS = 4
LINK = 5_000_000  # bytes/s shared by every connection: the link is the limit, whatever the worker count


def test_readers_catching_up_with_prefetch_on_a_saturated_link_never_stall_it(tmp_path, moto, s3, bucket, daemons):
    data = put_objects(s3, bucket, "s", FILES, SIZE)
    warm = list(put_objects(s3, bucket, "warm", 2, 2 * MiB))
    digests = {u: hashlib.sha256(b).hexdigest() for u, b in data.items()}
    uris = list(data)
    proxy = FaultProxy(moto.port, link_bandwidth=LINK).start()
    cache = tmp_path / "cache"
    try:
        # First two large objects alone: a few streams fill the link. Then the readers' files: prefetch
        # runs on all eight connections and moves no more, so the daemon judges the link saturated (the
        # judgement compares windows with fewer streams; without this first phase it depends on how the
        # readers happen to interleave, and many runs never saw it).
        m = tmp_path / "m.txt"
        d = daemons(cache, manifest=write_manifest(m, warm),
                    args=["--workers", "8", "--endpoint-url", proxy.url, "--max-size", "8M", "--min-free", "0"])
        d.wait_until(lambda st: st["objects"]["ready"] == 2, 120, "the two large objects fetched")
        write_manifest(tmp_path / "m.new", warm + uris).rename(m)
        d.wait_until(lambda st: st["manifest_entries"] == 2 + FILES, 120, "the readers' files in the manifest")
        readers_done = threading.Event()
        stalls: list[dict] = []
        seen_bytes = threading.Event()

        def watch() -> None:
            """The daemon's downloads must never sit at 0 B/s (over its 10 s throughput window) while work
            is queued and a reader still reads: that is the deadlock."""
            while not readers_done.wait(0.2):
                st = d.status()
                objs = st["objects"]
                if st["throughput_bytes_per_s"] > 0:
                    seen_bytes.set()
                elif seen_bytes.is_set() and objs["queued"] + objs["fetching"] > 0:
                    stalls.append({"objects": objs, "waiting": st["waiting"]})

        errors: list[BaseException] = []
        read: dict[int, int] = {}

        def reader(n: int) -> None:
            # Readers start a third of the manifest apart, so prefetch runs ahead of each of them at once
            # and more streams share the link than one reader's readahead would start.
            mine = uris[n * FILES // READERS:] + uris[:n * FILES // READERS]
            try:
                count = 0
                # Each file is waited on for at most 30 s: the deadlock shows as a ResolveTimeout.
                for uri, p in zip(mine, iter_resolve(mine, cache_dir=cache, timeout=30)):
                    assert hashlib.sha256(Path(p).read_bytes()).hexdigest() == digests[uri], uri
                    count += 1
                read[n] = count
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        watcher = threading.Thread(target=watch)
        watcher.start()
        rs = [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
        try:
            for t in rs:
                t.start()
            for t in rs:
                t.join(600)
        finally:
            readers_done.set()
            watcher.join(30)
        assert not errors, errors
        assert read == {n: FILES for n in range(READERS)}
        assert seen_bytes.is_set() and not stalls, stalls[:3]
        # With the readers gone, the link still answers: the first file was evicted long ago.
        first = uris[0]
        assert hashlib.sha256(Path(resolve(first, cache_dir=cache, timeout=60)).read_bytes()).hexdigest() == \
            digests[first]
    finally:
        proxy.stop()
