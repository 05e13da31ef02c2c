"""Prefetch objects whose size is not known (manifest lines without size=) through the CRT: one ranged
GET of the first ``crt_max`` bytes; an object that came whole is checked as a small one of known size,
a larger one keeps those bytes and gets its rest in botocore's pinned parts, every byte checked in
order. Against moto over HTTP through the fault proxy, and the real daemon."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from test_crt import CRT_AGENT, agents, temp_files
from test_wrong_bytes import multipart, on_nth

from s3cache.fetch.fetcher import Fetcher, NeedSpace, make_client
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.testing import wait_for

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def crt_fetcher(store):
    """``crt_fetcher(proxy, **Fetcher kwargs) -> Fetcher`` (CRT transport unless told), into ``store``."""
    made = []

    def make(proxy, workers=4, **kw):
        f = Fetcher(make_client(proxy.url, "us-east-1", 16, 5, 10), part_size=MiB, workers=workers,
                    max_attempts=3, cancel=threading.Event(), new_temp=store.new_temp, discard=store.discard, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def unsized(bucket: str, key: str) -> Entry:
    return Entry(ObjectRef(bucket, key))


def gets(proxy, key: str) -> list:
    return [e for e in proxy.seen(key) if e.method == "GET"]


def test_a_small_object_of_unknown_size_is_one_ranged_crt_get_checked(moto, bucket, proxy, crt_fetcher, store):
    body = os.urandom(256 * KiB)
    moto.client().put_object(Bucket=bucket, Key="k", Body=body)  # boto3's default CRC32
    f = crt_fetcher(proxy, prefetch_part_size=2 * MiB)
    admitted: list = []
    got = f.fetch(unsized(bucket, "k"), admit=lambda n: admitted.append(n) or True)
    assert Path(got.tmp_path).read_bytes() == body and got.size == len(body) and admitted == [len(body)]
    assert got.method == "s3-crc32"  # the claim of the (whole) ranged answer, checked: no HEAD
    [ex] = proxy.seen(f"/{bucket}/k")
    assert ex.headers["user-agent"].startswith(CRT_AGENT) and ex.headers["range"] == f"bytes=0-{2 * MiB - 1}"
    assert f.counters.requests == 1 and f.counters.bytes == len(body)
    assert temp_files(store) == [os.path.basename(got.tmp_path)]


@pytest.mark.parametrize("upload", ["md5-only", "crc32"])
def test_a_large_object_of_unknown_size_is_one_crt_get_then_botocore_parts(moto, s3, bucket, proxy, crt_fetcher,
                                                                            upload):
    """md5-only: the ETag's MD5 needs the bytes in order (the first part from the file, then the parts);
    crc32: S3's CRC, joined from the parts' own."""
    body = os.urandom(5 * MiB + 3)
    (s3 if upload == "md5-only" else moto.client()).put_object(Bucket=bucket, Key="k", Body=body)
    admitted: list = []
    counts = {}
    for transport in ("botocore", "crt"):
        proxy.exchanges.clear()
        f = crt_fetcher(proxy, prefetch_part_size=2 * MiB, transport=transport)
        got = f.fetch(unsized(bucket, "k"), admit=lambda n: admitted.append(n) or True)
        assert Path(got.tmp_path).read_bytes() == body and got.size == len(body)
        assert got.method == ("etag-md5" if upload == "md5-only" else "s3-crc32")
        counts[transport] = (f.counters.requests, len(gets(proxy, f"/{bucket}/k")))
    assert admitted == [len(body), len(body)]
    # no more requests than botocore's path: its first GET asks for the same 2 MiB
    assert counts["crt"] == counts["botocore"], counts
    first, *rest = gets(proxy, f"/{bucket}/k")
    assert first.headers["user-agent"].startswith(CRT_AGENT) and first.headers["range"] == f"bytes=0-{2 * MiB - 1}"
    assert rest and not any(e.headers["user-agent"].startswith(CRT_AGENT) for e in rest)
    assert {e.headers.get("if-match") for e in rest} == {got.etag}  # pinned to the first answer's version


@pytest.mark.parametrize("nth", [1, 3], ids=["in-the-crt-part", "in-a-later-part"])
def test_a_flipped_byte_anywhere_is_refused(s3, bucket, aws_proxy, crt_fetcher, store, nth):
    body = os.urandom(5 * MiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = on_nth(nth, "flip")
    f = crt_fetcher(aws_proxy, prefetch_part_size=2 * MiB)
    got = f.fetch(unsized(bucket, "k"), admit=lambda n: True)
    assert aws_proxy.faults["flip"] == 1 and f.counters.retries == 1
    assert Path(got.tmp_path).read_bytes() == body and got.method == "etag-md5"
    assert temp_files(store) == [os.path.basename(got.tmp_path)]
    # the refused attempt started with the CRT; its first answer taught the folder that its objects are
    # larger than crt_max, so the next attempt is botocore's
    firsts = [e for e in gets(aws_proxy, f"/{bucket}/k") if e.headers.get("range") == f"bytes=0-{2 * MiB - 1}"]
    assert [e.headers["user-agent"].startswith(CRT_AGENT) for e in firsts] == [True, False]


def test_multipart_objects_of_unknown_size(s3, bucket, aws_proxy, crt_fetcher):
    even = multipart(s3, bucket, "a/even", [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(MiB)])
    uneven = multipart(s3, bucket, "b/uneven", [os.urandom(5 * MiB), os.urandom(6 * MiB), os.urandom(5 * MiB)])
    f = crt_fetcher(aws_proxy, prefetch_part_size=2 * MiB)
    for key, body in (("a/even", even), ("b/uneven", uneven)):  # two folders: neither learned large yet
        got = f.fetch(unsized(bucket, key), admit=lambda n: True)
        assert Path(got.tmp_path).read_bytes() == body and got.method == "etag-multipart", key
        assert gets(aws_proxy, f"/{bucket}/{key}")[0].headers["user-agent"].startswith(CRT_AGENT)


def test_an_empty_object_of_unknown_size(s3, bucket, proxy, crt_fetcher, store):
    s3.put_object(Bucket=bucket, Key="e", Body=b"")
    f = crt_fetcher(proxy)
    got = f.fetch(unsized(bucket, "e"), admit=lambda n: True)
    assert got.size == 0 and Path(got.tmp_path).read_bytes() == b""
    # the CRT's ranged GET is answered 416 (no byte 0); the object is then asked for whole, as botocore's path does
    assert proxy.statuses(f"/{bucket}/e") == {416: 1, 200: 1} and f.counters.requests == 2
    assert temp_files(store) == [os.path.basename(got.tmp_path)]


@pytest.mark.parametrize("size", [200 * KiB + 7, 5 * MiB + 1], ids=["small", "large"])
@pytest.mark.parametrize("fault", ["flip", "short", "reset", "shift", "ignore-range", "range-as-200", "lie-total"])
def test_every_broken_answer_to_the_first_get_is_refused_or_repaired(s3, bucket, aws_proxy, crt_fetcher, store,
                                                                       fault, size):
    body = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = on_nth(1, fault)
    f = crt_fetcher(aws_proxy, prefetch_part_size=2 * MiB)
    got = f.fetch(unsized(bucket, "k"), admit=lambda n: True)
    assert aws_proxy.faults[fault] == 1
    assert Path(got.tmp_path).read_bytes() == body and got.size == len(body)
    assert gets(aws_proxy, f"/{bucket}/k")[0].headers["user-agent"].startswith(CRT_AGENT)
    assert temp_files(store) == [os.path.basename(got.tmp_path)]


@pytest.mark.parametrize("room", [True, False])
@pytest.mark.parametrize("size", [300 * KiB, 5 * MiB], ids=["small", "large"])
def test_the_total_is_admitted_before_a_byte_is_written(s3, bucket, proxy, crt_fetcher, store, room, size):
    """The cache's space invariant: ``admit`` reserves before a byte is written. The CRT holds the first
    answer's body until the total it gives is admitted; refused, nothing is written and no part asked for."""
    body = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    f = crt_fetcher(proxy, prefetch_part_size=2 * MiB)
    seen: list = []

    def admit(n: int) -> bool:
        seen.append((n, [os.path.getsize(os.path.join(store.layout.tmp, x)) for x in temp_files(store)]))
        return room

    if room:
        assert Path(f.fetch(unsized(bucket, "k"), admit=admit).tmp_path).read_bytes() == body
    else:
        with pytest.raises(NeedSpace) as ei:
            f.fetch(unsized(bucket, "k"), admit=admit)
        assert ei.value.size == size
        assert len(gets(proxy, f"/{bucket}/k")) == 1  # the first GET only: no part asked for
        assert temp_files(store) == []
    assert seen == [(size, [0])]  # asked once, while the temp file was still empty


def test_the_daemon_fetches_a_manifest_without_sizes_through_the_crt(tmp_path, s3, bucket, proxy, daemons):
    from conftest import write_manifest

    from s3cache import resolve
    from s3cache.daemon.demand import FIRST_FILES

    bodies = {f"s/{i:02d}": os.urandom(64 * KiB + i) for i in range(FIRST_FILES + 6)}
    bodies["l/zz-large"] = os.urandom(3 * MiB)  # its own folder: it probes it
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    lines = [f"s3://{bucket}/{k}" for k in bodies]
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", lines),
                args=["--workers", "4", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == len(bodies))
    crt = {}
    for k, b in bodies.items():
        assert Path(resolve(f"s3://{bucket}/{k}", cache_dir=d.cache_dir)).read_bytes() == b
        crt[k] = agents(proxy, f"/{bucket}/{k}")[0].startswith(CRT_AGENT)
    # the job's first files come as a reader's would (botocore); the rest start with one CRT GET, but
    # those asked for while their folder's first CRT GET (its probe) was out, which take botocore's
    probe_end = min(_answered(proxy, f"/{bucket}/{k}") for k in bodies if crt[k] and k.startswith("s/"))
    for i, k in enumerate(bodies):
        first = proxy.seen(f"/{bucket}/{k}")[0]
        assert crt[k] == (i >= FIRST_FILES) or (k.startswith("s/") and i >= FIRST_FILES and first.when < probe_end), k
    assert crt["l/zz-large"]
    large = proxy.seen(f"/{bucket}/l/zz-large") + proxy.seen(f"/{bucket}/l/zz-large", "HEAD")
    # the small ones: one request each; the large one: its CRT GET, its part, the HEAD asking for a checksum
    assert st["requests"] == len(bodies) - 1 + len(large), [(e.method, e.headers.get("range")) for e in large]
    assert [e.method for e in large].count("GET") == 2  # 2 MiB by the CRT, then the last 1 MiB in one part
    assert d.stop() == 0  # and the daemons fixture finds no loop error or traceback in its log


def test_a_reader_that_waits_on_it_during_the_crt_get_gets_the_rest_over_the_free_connections(s3, bucket, proxy,
                                                                                               crt_fetcher):
    """Promoted while its CRT GET is on its way (bounded: crt_max bytes), a prefetch's rest is laid out as
    a reader's object is, in small parts over the free connections; unpromoted, its share (one connection
    here) would take the rest in one part."""
    body = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    proxy.latency = 0.5
    f = crt_fetcher(proxy, workers=1, prefetch_part_size=8 * MiB)
    out: list = []
    t = threading.Thread(target=lambda: out.append(f.fetch(unsized(bucket, "k"), admit=lambda n: True)))
    t.start()
    try:
        wait_for(lambda: proxy.seen(f"/{bucket}/k"), 30, "the CRT's GET to reach the proxy")
        assert f.promote(f"s3://{bucket}/k")
    finally:
        t.join(60)
    assert not t.is_alive() and Path(out[0].tmp_path).read_bytes() == body
    first, *rest = gets(proxy, f"/{bucket}/k")
    assert first.headers["user-agent"].startswith(CRT_AGENT)
    assert [e.headers["range"] for e in rest] == [f"bytes={s}-{s + MiB - 1}" for s in range(2 * MiB, 6 * MiB, MiB)]
    assert f.link.readers == 0 and f._fg_idle.is_set()  # the promotion's count ended with the fetch


def test_a_folder_whose_last_object_was_large_sends_its_next_through_botocore(s3, bucket, proxy, crt_fetcher):
    """A larger object costs the CRT's way a GET and a HEAD more than botocore's one GET: once a folder's
    object of unknown size was larger than crt_max, its next goes through botocore, until one is small."""
    sizes = {"big/a": 5 * MiB, "big/b": 5 * MiB, "big/c": 100 * KiB, "big/d": 5 * MiB, "small/x": 100 * KiB}
    bodies = {k: os.urandom(n) for k, n in sizes.items()}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    f = crt_fetcher(proxy, prefetch_part_size=8 * MiB)
    for k in ("big/a", "big/b", "small/x", "big/c", "big/d"):
        assert Path(f.fetch(unsized(bucket, k), admit=lambda n: True).tmp_path).read_bytes() == bodies[k], k
    via = {k: [e.headers["user-agent"].startswith(CRT_AGENT) for e in gets(proxy, f"/{bucket}/{k}")] for k in bodies}
    assert {k: v[0] for k, v in via.items()} == {"big/a": True, "big/b": False, "small/x": True, "big/c": False,
                                                 "big/d": True}, via
    assert not any(any(v[1:]) for v in via.values()), via  # after a CRT GET, only botocore's parts
    assert gets(proxy, f"/{bucket}/big/b")[0].headers["range"] == f"bytes=0-{8 * MiB - 1}"  # one GET, as before


def test_a_pinned_version_of_unknown_size_comes_whole_from_that_version(s3, bucket, proxy, crt_fetcher):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = os.urandom(5 * MiB)
    v1 = s3.put_object(Bucket=bucket, Key="v", Body=old)["VersionId"]
    s3.put_object(Bucket=bucket, Key="v", Body=os.urandom(5 * MiB))
    f = crt_fetcher(proxy, prefetch_part_size=2 * MiB)
    got = f.fetch(Entry(ObjectRef(bucket, "v"), version=v1), admit=lambda n: True)
    assert Path(got.tmp_path).read_bytes() == old and got.version == v1
    first, *rest = gets(proxy, f"/{bucket}/v")
    assert first.headers["user-agent"].startswith(CRT_AGENT) and rest
    assert all(f"versionId={v1}" in e.query for e in [first, *rest])  # the version pins every part


def _answered(proxy, key: str) -> float:
    """When the proxy sent the last byte of ``key``'s first answered GET (monotonic)."""
    return next(end for method, path, _, _, _, end in proxy.request_bytes if method == "GET" and path == key)


def test_while_a_folders_probe_is_out_its_other_objects_go_through_botocore(s3, bucket, proxy, crt_fetcher):
    """Until one object of a folder has told its size, sending the others through the CRT as well would
    cost each of them, if large, a HEAD and a part more: one probes, the rest take botocore's one GET."""
    bodies = {k: os.urandom(100 * KiB) for k in ("f/a", "f/b", "f/c")}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    proxy.latency = 3.0  # the probe's answer is late: the second object starts while it is out
    f = crt_fetcher(proxy, prefetch_part_size=2 * MiB)
    out: list = []
    t = threading.Thread(target=lambda: out.append(f.fetch(unsized(bucket, "f/a"), admit=lambda n: True)))
    t.start()
    try:
        wait_for(lambda: proxy.seen(f"/{bucket}/f/a"), 30, "the probe's GET to reach the proxy")
        b = f.fetch(unsized(bucket, "f/b"), admit=lambda n: True)
    finally:
        t.join(60)
    assert Path(out[0].tmp_path).read_bytes() == bodies["f/a"] and Path(b.tmp_path).read_bytes() == bodies["f/b"]
    probe, other = gets(proxy, f"/{bucket}/f/a")[0], gets(proxy, f"/{bucket}/f/b")[0]
    assert probe.headers["user-agent"].startswith(CRT_AGENT)
    assert other.when < _answered(proxy, f"/{bucket}/f/a")  # asked while the probe was out...
    assert not other.headers["user-agent"].startswith(CRT_AGENT)  # ...so through botocore
    proxy.latency = 0.0
    c = f.fetch(unsized(bucket, "f/c"), admit=lambda n: True)  # the folder is known small now
    assert Path(c.tmp_path).read_bytes() == bodies["f/c"]
    assert gets(proxy, f"/{bucket}/f/c")[0].headers["user-agent"].startswith(CRT_AGENT)


def test_a_folder_learns_its_objects_are_large_from_the_probes_first_answer(s3, bucket, proxy, crt_fetcher):
    """Not when the probe's whole fetch ends: its rest (a HEAD, parts) takes round trips, and the folder's
    next objects should not each start with a ranged CRT GET meanwhile."""
    bodies = {k: os.urandom(5 * MiB) for k in ("g/a", "g/b")}
    for k, body in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=body)
    proxy.latency = 1.0
    f = crt_fetcher(proxy, prefetch_part_size=2 * MiB)
    out: list = []
    t = threading.Thread(target=lambda: out.append(f.fetch(unsized(bucket, "g/a"), admit=lambda n: True)))
    t.start()
    try:
        # the probe's first answer has come once the fetch asks for anything after it
        wait_for(lambda: len(proxy.seen(f"/{bucket}/g/a")) + len(proxy.seen(f"/{bucket}/g/a", "HEAD")) > 1, 60,
                 "the probe's rest to be asked for")
        b = f.fetch(unsized(bucket, "g/b"), admit=lambda n: True)
    finally:
        t.join(120)
    assert Path(out[0].tmp_path).read_bytes() == bodies["g/a"] and Path(b.tmp_path).read_bytes() == bodies["g/b"]
    assert gets(proxy, f"/{bucket}/g/a")[0].headers["user-agent"].startswith(CRT_AGENT)
    assert not any(e.headers["user-agent"].startswith(CRT_AGENT) for e in gets(proxy, f"/{bucket}/g/b"))
