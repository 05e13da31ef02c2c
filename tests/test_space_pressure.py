"""Space under pressure, end to end with the real daemon: the readahead window of a small cache, leases
with the default --lease, a filesystem smaller than --max-size, an object that grew in S3, a full disk
during prefetch, and status saying why prefetch stands still (issues 11.2, 11.3, 17.5, 17.11, 17.12, 19)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import gets_per_epoch, put_objects, write_manifest
from rich.console import Console

from s3cache import iter_resolve, resolve
from s3cache.cli import main
from s3cache.errors import FetchFailed
from s3cache.policy import simulate
from s3cache.service.progress import render
from s3cache.testing import FAKE_CREDENTIALS, wait_for

KiB, MiB = 1 << 10, 1 << 20


def text_of(st: dict) -> str:
    console = Console(file=StringIO(), width=200, color_system=None)
    console.print(render(st))
    return console.file.getvalue()


class Reader(threading.Thread):
    """resolve() in a thread: its result or its exception."""

    def __init__(self, uris, cache_dir, timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.args_ = (uris, cache_dir, timeout)
        self.result = self.error = None

    def run(self) -> None:
        uris, cache_dir, timeout = self.args_
        try:
            self.result = resolve(uris, cache_dir=cache_dir, timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e


def test_a_small_cache_fetches_beladys_count_per_epoch_not_lrus(tmp_path, s3, bucket, proxy, daemons):
    """Issue 11.3 at the smallest scale: 20 x 1 MiB read in order for three epochs through a 10.5 MiB
    cache with the default --readahead and --lease. The window is bounded by a sixteenth of the cache
    (here 0: readahead only into free room), so epochs 2 and 3 fetch Belady's 10, not LRU's 20."""
    data = put_objects(s3, bucket, "ds", 20, MiB)
    uris = list(data)
    max_size = 21 * MiB // 2
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"{u} size={MiB}" for u in uris]),
                args=["--endpoint-url", proxy.url, "--max-size", str(max_size)])
    gets = gets_per_epoch(proxy, bucket, data, d.cache_dir)
    st = d.status()
    trace = simulate.cyclic(20, 3)
    sim = simulate.after_first_epoch(simulate.daemon, trace, 20, max_size, MiB, list(range(20)))
    opt = simulate.after_first_epoch(simulate.belady, trace, 20, 10)
    print(f"GETs per epoch {gets}; simulator {sim.gets} and Belady {opt.gets} for epochs 2-3; "
          f"status epochs {st['epochs']}")
    assert st["bytes"]["ready"] <= max_size
    assert sim.gets == opt.gets == 20
    # LRU (and the window before) fetched 20 + 18. Leases may cost up to two more: the reader's two newest
    # files, which Belady would evict. Measured here: [10, 10] in 52 runs of 52 (40 under a CPU hog) since
    # admission keeps the window too; before, a prefetch beyond it evicted read files ([13, 13], 1 in 4).
    assert sum(gets[1:]) <= opt.gets + 2 and all(g <= 12 for g in gets[1:]), gets


def test_the_default_lease_streams_a_dataset_three_times_the_cache(tmp_path, s3, bucket, daemons):
    """Issue 17.5: with the default --lease 600 a cache smaller than ten minutes of reading must not
    deadlock its reader: a lease holds the reader's newest files, not everything it read for 600 s."""
    data = put_objects(s3, bucket, "big", 30, 64 * KiB)
    uris = list(data)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris),
                args=["--max-size", str(10 * 64 * KiB + 32 * KiB), "--workers", "4"])
    for uri, p in zip(uris, iter_resolve(uris, cache_dir=d.cache_dir, timeout=60)):
        assert Path(p).read_bytes() == data[uri]
    st = d.status()
    assert st["evicted"] >= 20 and st["bytes"]["ready"] <= 10 * 64 * KiB + 32 * KiB
    # what the lease holds now: this reader's two newest files
    assert st["leases"]["readers"] == 1 and st["leases"]["files"] == 2
    assert st["leases"]["bytes"] == 128 * KiB
    assert "leases hold 2 files (128.0 KiB) for 1 reader" in text_of(st)


def _resolve_in_process(cache_dir, uris) -> None:
    """Resolve ``uris`` in a reader process of its own (its own reader id, so its own lease)."""
    code = "import sys; from s3cache import resolve; resolve(sys.argv[2:], cache_dir=sys.argv[1], timeout=120)"
    subprocess.run([sys.executable, "-c", code, str(cache_dir), *uris], check=True, timeout=180,
                   env={**os.environ, **FAKE_CREDENTIALS})


def test_a_reader_waiting_for_space_is_told_why_in_status_and_the_log(tmp_path, s3, bucket, daemons):
    """Issue 17.5 and 19: pinned files and two readers' leases fill the cache; a third reader waits, and
    status, its text view and the log say for what and why; the wait ends when a pin is released."""
    size = 64 * KiB
    data = put_objects(s3, bucket, "w", 7, size)
    uris = list(data)
    d = daemons(args=["--max-size", str(6 * size), "--workers", "2"])
    r = CliRunner().invoke(main, ["pin", "--cache-dir", str(d.cache_dir), uris[0], uris[1]])
    assert r.exit_code == 0, r.output
    d.wait_until(lambda st: st["pinned"]["files"] == 2, what="the pinned files to land")
    _resolve_in_process(d.cache_dir, uris[2:4])  # reader 1: its two newest files are leased
    _resolve_in_process(d.cache_dir, uris[4:6])  # reader 2
    st = d.wait_until(lambda st: st["leases"]["files"] == 4)
    assert st["leases"]["readers"] == 2 and st["leases"]["bytes"] == 4 * size
    waiting = Reader(uris[6], d.cache_dir)
    waiting.start()
    st = d.wait_until(lambda st: st["waiting_for_space"], what="the reader to wait for room")
    [w] = st["waiting_for_space"]
    assert w["uri"] == uris[6] and w["reader_waits"] and w["limit"] == "max_size" and w["need"] == size
    assert w["held"]["pinned"] == 2 * size and w["held"]["leased"] + w["held"]["being_read"] == 4 * size
    out = text_of(st)
    assert f"a reader waits for room for {uris[6]}" in out and "pinned 128.0 KiB" in out
    assert "leases hold 4 files (256.0 KiB) for 2 readers" in out
    assert f"a reader waits for room for {uris[6]}" in d.log() and "pinned 128.0 KiB" in d.log()
    r = CliRunner().invoke(main, ["unpin", "--cache-dir", str(d.cache_dir), uris[0]])
    assert r.exit_code == 0, r.output
    waiting.join(150)
    assert waiting.error is None and Path(waiting.result).read_bytes() == data[uris[6]]
    assert d.wait_until(lambda st: not st["waiting_for_space"])


def test_a_reader_is_never_starved_when_the_filesystem_is_the_limit(tmp_path, s3, bucket, daemons, small_fs):
    """Issue 11.2: a 12 MiB filesystem, --max-size 1G, ten 3 MiB objects read one at a time in manifest
    order. Prefetch admits no more bytes in parallel than the filesystem holds, and the reader's file
    is always admitted by evicting files needed later (it failed ~1 run in 4 under a CPU hog)."""
    fs = small_fs("12m")
    data = put_objects(s3, bucket, "o", 10, 3 * MiB)
    d = daemons(fs / "cache", manifest=write_manifest(tmp_path / "m.txt", list(data)),
                args=["--max-size", "1G", "--lease", "0"])
    for uri, body in data.items():
        assert Path(resolve(uri, cache_dir=d.cache_dir, timeout=120)).read_bytes() == body
    st = d.status()
    assert st["objects"]["failed"] == 0 and st["evicted"] >= 6
    assert "no space left" not in d.log()  # admission kept downloads within the filesystem


def test_an_object_that_grew_in_s3_is_never_published_past_max_size(tmp_path, s3, bucket, daemons):
    """Issue 17.11: a refetch reserves the size of the old copy; the real size is admitted again. Here it
    can never fit beside the pin (800 + 300 KiB > 1 MiB): the refetch fails (PinnedFull, retried with
    backoff); the old copy, known superseded, is never handed out again: a reader gets PinnedFull."""
    a, b = f"s3://{bucket}/grow/a", f"s3://{bucket}/grow/b"
    old = os.urandom(300 * KiB)
    s3.put_object(Bucket=bucket, Key="grow/a", Body=old)
    s3.put_object(Bucket=bucket, Key="grow/b", Body=os.urandom(300 * KiB))
    max_size = 1 * MiB
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [a, f"{b} pin=1"]),
                args=["--max-size", str(max_size), "--lease", "0"])
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    s3.put_object(Bucket=bucket, Key="grow/a", Body=os.urandom(800 * KiB))  # 800 + 300 KiB > 1 MiB
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", a])
    assert a in r.output, r.output
    st = d.wait_until(lambda st: st["bytes"]["ready"] > max_size
                      or any(f["uri"] == a for f in st["failures"]), what="the refetch to settle")
    assert st["bytes"]["ready"] + st["bytes"]["reserved"] <= max_size, st["bytes"]
    [f] = [f for f in st["failures"] if f["uri"] == a]
    assert f["code"] == "PinnedFull", f
    log = d.log()
    assert "not the 300.0 KiB reserved for it" in log  # reserved as the old copy, then admitted again
    assert "a reader waits for room for " + a + " (800.0 KiB" in log
    with pytest.raises(FetchFailed, match="PinnedFull"):  # the reason, never the old bytes
        resolve([a], cache_dir=d.cache_dir, timeout=30)
    # its backoff passes: tried again (the housekeeping loop releases it), failing the same way
    d.wait_until(lambda st: any(f["uri"] == a and f["attempts"] >= 2 for f in st["failures"]),
                 what="the refetch to be retried")
    assert "releasing failures whose backoff passed failed" not in d.log()
    st = d.status()
    assert st["bytes"]["ready"] + st["bytes"]["reserved"] <= max_size, st["bytes"]
    with pytest.raises(FetchFailed, match="PinnedFull"):
        resolve([a], cache_dir=d.cache_dir, timeout=30)


def test_a_full_disk_during_prefetch_never_loses_the_object(tmp_path, s3, bucket, proxy, daemons, small_fs):
    """Issue 17.12: ENOSPC after admission (another writer filled the filesystem); eviction makes room
    and the daemon "tries again": the job must be re-queued, and a reader waiting on it gets it."""
    fs = small_fs("8m")
    x, y = f"s3://{bucket}/d/x", f"s3://{bucket}/d/y"
    body_x, body_y = os.urandom(MiB), os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="d/x", Body=body_x)
    s3.put_object(Bucket=bucket, Key="d/y", Body=body_y)
    m = write_manifest(tmp_path / "m.txt", [])
    d = daemons(fs / "cache", manifest=m, args=["--endpoint-url", proxy.url, "--max-size", "100M",
                                                "--min-free", "0", "--lease", "0", "--workers", "2"])
    # x, outside the manifest, read: the file eviction takes for y (and no cursor to rewind for it)
    assert Path(resolve(x, cache_dir=d.cache_dir, timeout=120)).read_bytes() == body_x
    proxy.latency = 4.0  # y's GET answers late: room to fill the filesystem after y was admitted
    write_manifest(m, [f"{y} size={MiB}"])
    d.wait_until(lambda st: st["bytes"]["reserved"] >= MiB, what="y to be admitted")
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 256 * KiB))  # y (1 MiB) no longer fits
    waiting = Reader(y, d.cache_dir, timeout=60)
    waiting.start()
    wait_for(lambda: "trying again" in d.log() or "prefetch paused until space returns" in d.log(), 60,
             "the full disk to be noticed")
    assert "trying again" in d.log()  # the situation of the issue: x evicted for y
    proxy.latency = 0.0
    filler.unlink()  # space returns
    waiting.join(150)
    assert waiting.error is None and Path(waiting.result).read_bytes() == body_y


def test_min_free_and_a_reader_waited_on_fetch_are_said(tmp_path, s3, bucket, proxy, daemons, small_fs):
    """Issue 19: why prefetch stands still: --min-free reached; prefetch yields to a fetch a reader
    waits on. Each a field of status --json and a line of the text view."""
    fs = small_fs("8m")
    data = put_objects(s3, bucket, "f", 6, MiB)
    (fs / "filler").write_bytes(b"\0" * (3 * MiB))
    d = daemons(fs / "cache", manifest=write_manifest(tmp_path / "m.txt", list(data)),
                args=["--max-size", "100M", "--min-free", "0.4", "--workers", "1"])
    st = d.wait_until(lambda st: st["min_free_reached"] and st["objects"]["fetching"] == 0)
    assert st["objects"]["ready"] < 6 and not st["disk_full"]
    assert "free space below --min-free: prefetch paused" in text_of(st)
    d.stop()

    slow = put_objects(s3, bucket, "s", 3, MiB)
    proxy.bandwidth = 128 * KiB  # each object takes ~8 s
    d2 = daemons(tmp_path / "cache2", manifest=write_manifest(tmp_path / "m2.txt", list(slow)),
                 args=["--endpoint-url", proxy.url, "--max-size", "100M", "--workers", "4"])
    assert d2.status()["prefetch_yields_to"] == 0
    waiting = Reader(list(slow)[2], d2.cache_dir)
    waiting.start()
    st = d2.wait_until(lambda st: st["prefetch_yields_to"] == 1, what="the reader to wait on a fetch")
    assert "prefetch yields to 1 fetch a reader waits on" in text_of(st)
    proxy.bandwidth = 0.0
    waiting.join(150)
    assert waiting.error is None
