"""The first record in a second: a reader's object starts at once whatever prefetch is doing, the first
files a job opens come over many connections, and so does the rest of a prefetch a reader starts waiting
on; each shown from the proxy's request log (what reached S3, in what order, which answers overlapped),
never from a clock in the test."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
from conftest import write_manifest

from s3cache import iter_resolve, resolve
from s3cache.daemon.demand import FIRST_FILES
from s3cache.fetch.link import Link
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy, most_at_once

MiB = 1 << 20


def test_a_readers_object_starts_while_every_worker_streams_a_large_prefetch(tmp_path, moto, s3, bucket, daemons):
    """Two workers, both streaming a 24 MiB prefetch at 1 MiB/s per connection: a reader's small object
    (outside the manifest) is asked for. Its GET reaches S3 while both prefetches are still streaming,
    not once one of them has finished (a worker per connection used to hold it back that long)."""
    small = os.urandom(256 << 10)
    s3.put_object(Bucket=bucket, Key="reader/small", Body=small)
    head = [f"s3://{bucket}/head/{i}" for i in range(4)]  # the first files: fetched first, out of the way
    for uri in head:
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=b"h" * 1000)
    big = [f"s3://{bucket}/big/{i}" for i in range(2)]
    for uri in big:
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=os.urandom(24 * MiB))
    proxy = FaultProxy(moto.port, bandwidth=MiB).start()
    try:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", head + big),
                    args=["--workers", "2", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0"])
        big_paths = [f"/{bucket}/big/{i}" for i in range(2)]

        def streaming() -> bool:
            return all(any(x.status == 206 and not x.done for x in proxy.seen(p)) for p in big_paths)

        wait_for(streaming, 120, "both workers streaming a large prefetch")
        path = resolve(f"s3://{bucket}/reader/small", cache_dir=d.cache_dir, timeout=120)
        with open(path, "rb") as f:
            assert f.read() == small
        first = proxy.seen(f"/{bucket}/reader/small")[0]
        ended = [end for (m, p, _r, _n, _s, end) in proxy.request_bytes if m == "GET" and p in big_paths]
        assert all(first.when < end for end in ended), "the reader's GET waited for a prefetch to finish"
        assert d.status()["loop_errors"] == {}
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


def _share(i: int, workers: int) -> int:
    """The connections the ``i``-th first file is spread over: the first files together fill them."""
    return max(1, workers // FIRST_FILES + (i < workers % FIRST_FILES))


def _upload(s3, bucket: str, folder: str, n: int, size: int) -> tuple[list[str], dict[str, bytes]]:
    """``n`` objects of ``size`` random bytes, ``folder/00`` on: their URIs in order, and their bodies."""
    uris = [f"s3://{bucket}/{folder}/{i:02d}" for i in range(n)]
    data = {u: os.urandom(size) for u in uris}
    for u, body in data.items():
        s3.put_object(Bucket=bucket, Key=u.split("/", 3)[3], Body=body)
    return uris, data


def test_a_job_of_one_object_spreads_it_over_every_connection(tmp_path, moto, s3, bucket, daemons):
    """Fewer objects than first files: the connections are shared between those there are, so one object
    alone (the matrix's 256 MiB cell) takes all of them, not the share of one of ``FIRST_FILES``."""
    workers = 4
    body = os.urandom(8 * MiB)
    s3.put_object(Bucket=bucket, Key="one/big", Body=body)
    proxy = FaultProxy(moto.port, bandwidth=2 * MiB).start()
    try:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/one/big"]),
                    args=["--workers", str(workers), "--endpoint-url", proxy.url, "--max-size", "1G",
                          "--min-free", "0"])
        d.wait_until(lambda st: st["objects"]["ready"] == 1, 120, "the object cached")
        asked = [x.headers.get("range") for x in proxy.seen(f"/{bucket}/one/big")]
        # a 1 MiB first range, then its other 7 MiB in one part per connection
        assert asked[0] == f"bytes=0-{MiB - 1}" and len(asked) == 1 + workers, asked
        with open(resolve(f"s3://{bucket}/one/big", cache_dir=d.cache_dir, timeout=60), "rb") as f:
            assert f.read() == body
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


def test_the_first_files_a_job_opens_fill_the_connections_before_any_other_prefetch(tmp_path, moto, s3, bucket,
                                                                                      daemons):
    """Twice as many connections as first files (``FIRST_FILES``: what TFRecordDataset with AUTOTUNE opens
    before its first record), paced at 2 MiB/s, and more 4 MiB objects of unknown size, no reader yet: each
    first file is asked for in a 1 MiB first range and then its share of the connections in ranges (two
    here: together they fill the connections, no more requests than that), and every GET of the first
    files reaches S3 before any other object's: no other prefetch takes a connection until all their
    bytes are asked for. The files after them are plain prefetch."""
    workers = 2 * FIRST_FILES
    n = FIRST_FILES + 5
    uris, data = _upload(s3, bucket, "d", n, 4 * MiB)
    proxy = FaultProxy(moto.port, bandwidth=2 * MiB).start()
    try:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris),
                    args=["--workers", str(workers), "--endpoint-url", proxy.url, "--max-size", "1G",
                          "--min-free", "0"])
        d.wait_until(lambda st: st["objects"]["ready"] == n, 120, "every object cached")
        # The proxy logs an answer just after its last byte left, which may be after the daemon had it.
        wait_for(lambda: all(x.done for x in proxy.seen(f"/{bucket}/d/")), 60, "the proxy to log every answer")
        first = [x for i in range(FIRST_FILES) for x in proxy.seen(f"/{bucket}/d/{i:02d}")]
        others = [x for i in range(FIRST_FILES, n) for x in proxy.seen(f"/{bucket}/d/{i:02d}")]
        for i in range(FIRST_FILES):
            asked = [x.headers.get("range") for x in proxy.seen(f"/{bucket}/d/{i:02d}")]  # in the order sent
            assert asked[0] == f"bytes=0-{MiB - 1}" and len(asked) == 1 + _share(i, workers), (i, asked)
        assert len(first) == FIRST_FILES + workers
        assert max(x.when for x in first) < min(x.when for x in others), \
            [(x.path, x.headers.get("range")) for x in sorted(first + others, key=lambda x: x.when)]
        for i in range(FIRST_FILES, n):  # plain prefetch: one GET (of --prefetch-part-size), or, while its
            # folder's sizes are unknown to the daemon, the CRT's GET of the first 2 MiB and the rest in one part
            asked = [x.headers.get("range") for x in proxy.seen(f"/{bucket}/d/{i:02d}")]
            assert asked in (["bytes=0-67108863"], [f"bytes=0-{2 * MiB - 1}", f"bytes={2 * MiB}-{4 * MiB - 1}"]), \
                (i, asked)
        early = [(r[4], r[5]) for r in proxy.request_bytes
                 if r[0] == "GET" and r[1] in {f"/{bucket}/d/{i:02d}" for i in range(FIRST_FILES)}]
        assert most_at_once(early) >= workers, early  # the first files' parts filled the connections
        for u, body in data.items():
            with open(resolve(u, cache_dir=d.cache_dir, timeout=60), "rb") as f:
                assert f.read() == body
        assert d.status()["loop_errors"] == {}
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


def test_first_files_as_many_as_the_connections_come_in_one_get_each_before_other_prefetch(tmp_path, moto, s3,
                                                                                              bucket, daemons):
    """Two connections, no more than the first files: each first file fills a connection on its own, so it
    comes in one GET (parts would only add requests), and the first files' GETs reach S3 before any other
    object's."""
    n = FIRST_FILES + 3
    uris, data = _upload(s3, bucket, "o", n, 3 * MiB)
    proxy = FaultProxy(moto.port, bandwidth=4 * MiB).start()
    try:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris),
                    args=["--workers", "2", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0"])
        d.wait_until(lambda st: st["objects"]["ready"] == n, 120, "every object cached")
        wait_for(lambda: all(x.done for x in proxy.seen(f"/{bucket}/o/")), 60, "the proxy to log every answer")
        for i in range(FIRST_FILES):
            asked = [x.headers.get("range") for x in proxy.seen(f"/{bucket}/o/{i:02d}")]
            assert asked == ["bytes=0-67108863"], (i, asked)  # the whole object, as plain prefetch asks
        first = [x.when for i in range(FIRST_FILES) for x in proxy.seen(f"/{bucket}/o/{i:02d}")]
        others = [x.when for i in range(FIRST_FILES, n) for x in proxy.seen(f"/{bucket}/o/{i:02d}")]
        assert max(first) < min(others)
        for u, body in data.items():
            with open(resolve(u, cache_dir=d.cache_dir, timeout=60), "rb") as f:
                assert f.read() == body
        assert d.status()["loop_errors"] == {}
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


def test_a_prefetch_a_reader_starts_waiting_on_is_split_over_the_free_connections(tmp_path, moto, s3, bucket,
                                                                                  daemons):
    """A 12 MiB prefetch streams on one connection at 1 MiB/s when a reader asks for it: the rest of it
    comes in ranged parts on several connections at once (its one GET is cut short at a chunk), and
    the file is whole and verified (the object carries a CRC32 that the daemon checks)."""
    body = os.urandom(12 * MiB)
    checked = moto.client()  # boto3's default: a whole-object CRC32 stored with the object
    checked.put_object(Bucket=bucket, Key="big", Body=body)
    head = [f"s3://{bucket}/head/{i}" for i in range(4)]  # the job's first files, out of the way
    for uri in head:
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=b"h" * 1000)
    uri = f"s3://{bucket}/big"
    proxy = FaultProxy(moto.port, bandwidth=MiB).start()
    try:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", head + [uri]),
                    args=["--workers", "4", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0"])
        wait_for(lambda: any(x.status == 206 and not x.done for x in proxy.seen(f"/{bucket}/big")), 120,
                 "the prefetch of big streaming")
        [prefetch] = proxy.seen(f"/{bucket}/big")
        with open(resolve(uri, cache_dir=d.cache_dir, timeout=120), "rb") as f:
            assert f.read() == body
        parts = [x for x in proxy.seen(f"/{bucket}/big") if x is not prefetch]
        assert len(parts) >= 2, [x.headers.get("range") for x in parts]
        # The proxy logs an answer just after its last byte left, which may be after the reader had it.
        wait_for(lambda: all(x.done for x in parts), 60, "the proxy to log every part's answer")
        later = [(r[2], r[4], r[5]) for r in proxy.request_bytes if r[0] == "GET" and r[1] == f"/{bucket}/big"]
        assert most_at_once([(s, e) for _, s, e in later]) >= 2, later
        st = d.status()
        assert st["loop_errors"] == {} and st["objects"]["ready"] == 5
        assert st["verified_by"].get("s3-crc32") == 1, st["verified_by"]  # big's CRC32, its bytes fed in order
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


@pytest.mark.parametrize("checksum", ["md5", "crc32"])
def test_a_prefetch_in_ranged_parts_a_reader_starts_waiting_on_is_split_further(tmp_path, moto, s3, bucket, daemons,
                                                                               checksum):
    """A 24 MiB prefetch streams in three 8 MiB ranged parts (--prefetch-part-size 8M), one connection
    each at 2 MiB/s, when a reader asks for it: the rest of each part comes in smaller ranges over the
    free connections (each part's GET is cut short at a chunk), and the file is whole and verified:
    by its MD5 ETag (no additional checksum: the digest fed in order, from the file for the rest) or by
    its CRC32 (each part's CRC fed its rest from the file, then joined)."""
    body = os.urandom(24 * MiB)
    (moto.client() if checksum == "crc32" else s3).put_object(Bucket=bucket, Key="big", Body=body)
    head = [f"s3://{bucket}/head/{i}" for i in range(4)]  # the job's first files, out of the way
    for uri in head:
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=b"h" * 1000)
    uri = f"s3://{bucket}/big"
    proxy = FaultProxy(moto.port, bandwidth=2 * MiB).start()
    try:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", head + [uri]),
                    args=["--workers", "4", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0",
                          "--prefetch-part-size", "8M", "--transport", "botocore"])  # parts from byte 0
        part_starts = {0, 8 * MiB, 16 * MiB}
        wait_for(lambda: len([x for x in proxy.seen(f"/{bucket}/big") if x.status == 206 and not x.done]) == 3,
                 120, "the prefetch of big streaming its three parts")
        with open(resolve(uri, cache_dir=d.cache_dir, timeout=120), "rb") as f:
            assert f.read() == body
        asked = [x.headers.get("range") for x in proxy.seen(f"/{bucket}/big")]
        starts = [int(r.split("=")[1].split("-")[0]) for r in asked]
        assert set(starts[:3]) == part_starts, asked  # the prefetch's layout: three 8 MiB parts
        later = [s for s in starts[3:] if s not in part_starts]
        assert len(later) >= 3, asked  # each part's rest, in ranges of its own
        st = d.status()
        assert st["loop_errors"] == {} and st["objects"]["ready"] == 5
        if checksum == "crc32":
            assert st["verified_by"].get("s3-crc32") == 1, st["verified_by"]
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


def test_a_readers_next_files_hinted_before_the_manifest_lists_them_come_over_many_connections(tmp_path, moto, s3,
                                                                                                bucket, daemons):
    """No manifest lists them yet (a job reads before the daemon installed its manifest; the objects are
    in the demand scope by --allow): a reader waits on the first of eight 6 MiB objects and hints the
    rest. Its next files up to the ``FIRST_FILES``-th come as the first files of a manifest would, a 1 MiB
    first range and then the rest in ranges, not each in one GET on one connection beside all the
    others."""
    uris = [f"s3://{bucket}/h/{i}" for i in range(8)]
    data = {u: os.urandom(6 * MiB) for u in uris}
    for u, body in data.items():
        s3.put_object(Bucket=bucket, Key=u.split("/", 3)[3], Body=body)
    proxy = FaultProxy(moto.port, bandwidth=2 * MiB).start()
    try:
        d = daemons(args=["--workers", "6", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0"])
        for u, path in zip(uris, iter_resolve(uris, cache_dir=d.cache_dir, timeout=120)):
            with open(path, "rb") as f:
                assert f.read() == data[u]
        for i in range(1, 8):
            asked = [x.headers.get("range") for x in proxy.seen(f"/{bucket}/h/{i}")]  # in the order sent
            if i < FIRST_FILES:
                assert asked[0] == f"bytes=0-{MiB - 1}" and len(asked) >= 3, (i, asked)
            else:  # plain prefetch: one GET of --prefetch-part-size, or the CRT's of the first 2 MiB while its
                # folder's sizes are unknown to the daemon (the rest cut and re-split if the reader came)
                assert asked[0] in ("bytes=0-67108863", f"bytes=0-{2 * MiB - 1}"), (i, asked)
        assert d.status()["loop_errors"] == {}
        assert d.stop() == 0, d.log()
    finally:
        proxy.stop()


def test_early_prefetch_goes_before_other_prefetch_and_after_readers():
    """The link's three ranks: a plain prefetch stream yields its slot to an early part waiting, and
    plain prefetch waits while one does; an early stream yields to a reader's part, not to another early."""
    link = Link(2)
    plain = SimpleNamespace(foreground=False)
    early = SimpleNamespace(foreground=False, early=True)
    link.acquire(False, plain)
    link.acquire(False, early)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (link.acquire(False, early), got.set()))
    waiter.start()
    wait_for(lambda: link.early_waiting == 1, 30, "the early part to wait")
    assert link.should_yield(plain) and not link.should_yield(early)
    assert link.free() == 0
    yielded = threading.Thread(target=lambda: link.pause(plain))  # gives its slot up, waits for one again
    yielded.start()
    assert got.wait(30), "the early part never got the slot plain prefetch gave up"
    waiter.join(30)
    assert (link.fg, link.bg) == (0, 2)
    reader = threading.Thread(target=lambda: link.acquire(True))
    reader.start()
    wait_for(lambda: link.fg_waiting == 1, 30, "the reader's part to wait")
    assert link.should_yield(early)
    link.release(False)  # an early stream ends: the reader's part takes the slot, not the plain stream
    reader.join(30)
    assert (link.fg, link.bg) == (1, 1) and yielded.is_alive()
    link.release(True)
    link.release(False)
    yielded.join(30)
    assert (link.fg, link.bg) == (0, 1) and link.yields == 1
    link.release(False)


def test_among_early_prefetch_the_jobs_first_file_goes_first():
    """An early stream of the job's second file yields its slot to a waiting part of the first file, and
    a later file's part waits while an earlier one's does; the first file's stream never yields to a later."""
    link = Link(1)
    first = SimpleNamespace(foreground=False, early=True, order=0)
    second = SimpleNamespace(foreground=False, early=True, order=1)
    link.acquire(False, second)
    got: list[str] = []
    waiters = [threading.Thread(target=lambda w=w, name=name: (link.acquire(False, w), got.append(name)))
               for w, name in ((second, "second"), (first, "first"))]
    waiters[0].start()
    wait_for(lambda: link.early_waiting == 1, 30, "a part of the second file to wait")
    assert not link.should_yield(second)  # the same file's part: no reason to hand over
    waiters[1].start()
    wait_for(lambda: link.early_waiting == 2, 30, "a part of the first file to wait")
    assert link.should_yield(second)
    link.release(False)  # the second file's stream ends: the first file's part takes the slot
    wait_for(lambda: got, 30, "a waiting part to take the slot")
    assert got == ["first"] and not link.should_yield(first)
    link.release(False)
    wait_for(lambda: len(got) == 2, 30, "the second file's part to take the slot")
    link.release(False)
    for t in waiters:
        t.join(30)


def test_early_parts_waiting_for_long_never_stop_prefetch_yielding_to_the_next_reader():
    """Early parts may wait for a slot for long. A reader's part that a stream yielded to, once it took
    its slot, must leave no handoff behind them: the next reader's part gets a stream to yield too
    (a count shared with the early parts kept one, and a reader's object waited for a 16 MiB part)."""
    link = Link(2)
    a = SimpleNamespace(foreground=False, early=True, order=0)
    b = SimpleNamespace(foreground=False, early=True, order=1)
    link.acquire(False, a)
    link.acquire(False, b)
    part = threading.Thread(target=lambda: link.acquire(False, a))  # a's next part waits for a slot
    part.start()
    wait_for(lambda: link.early_waiting == 1, 30, "an early part to wait")
    reader = threading.Thread(target=lambda: link.acquire(True))
    reader.start()
    wait_for(lambda: link.fg_waiting == 1, 30, "the first reader's part to wait")
    assert link.should_yield(b)
    paused = threading.Thread(target=lambda: link.pause(b))
    paused.start()
    reader.join(30)
    assert link.fg == 1
    link.release(True)  # the reader's part is done: a's waiting part (the earlier file) takes the slot
    part.join(30)
    assert (link.fg, link.bg) == (0, 2) and paused.is_alive()
    second = threading.Thread(target=lambda: link.acquire(True))
    second.start()
    wait_for(lambda: link.fg_waiting == 1, 30, "the second reader's part to wait")
    assert link.should_yield(a), "no stream yields to the second reader's part"
    link.release(False)
    second.join(30)
    link.release(True)
    paused.join(30)
    link.release(False)
    link.release(False)
    assert (link.fg, link.bg) == (0, 0)
