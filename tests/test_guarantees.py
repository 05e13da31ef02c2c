"""The guarantees, one deterministic test each, at the level where users meet them: the real daemon, a real
reader, moto's S3 server behind the fault proxy (which records every request it relays), and the kernel's
file events (inotify) rather than polling, so a file that exists for a microsecond is still seen.

Each test names its guarantee and asserts the situation it needs actually happened (the fault was
injected, the 412 was answered, the eviction ran), so it cannot pass vacuously.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import write_manifest
from fileevents import FileEvents

from s3cache import FetchFailed, resolve
from s3cache.store.paths import PRIVATE_DIR
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB, MiB = 1 << 10, 1 << 20


def outside_private(cache: Path):
    private = str(cache / PRIVATE_DIR) + os.sep
    return lambda p: p.startswith(private)


@pytest.mark.parametrize("fault", ["flip-every-get", "wrong-sha256"])
def test_a_mismatching_object_is_never_visible_under_the_cache_root(tmp_path, s3, bucket, proxy, daemons, fault):
    """An object whose bytes never match (every GET of it has a byte flipped, or the manifest claims a
    wrong sha256=) fails with its checksum error; resolve raises it; and no file of it ever appears
    anywhere a reader could look (all of the cache root but the daemon's private directory), at any
    moment: every file event there is one of the good objects, with its right bytes. This is also the
    readable-path half of test_fetch.py::test_manifest_checksum_wins_and_a_mismatch_is_never_handed_back,
    which looks at the temp dir only."""
    bodies = {k: os.urandom(200 * KiB) for k in ("good-1", "bad", "good-2")}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    if fault == "flip-every-get":
        proxy.plan = lambda m, p, q: "flip" if m == "GET" and p == f"/{bucket}/bad" else None
        bad_line, codes = f"s3://{bucket}/bad", {"DigestMismatch", "ChecksumMismatch"}  # DigestMismatch is a ChecksumMismatch
    else:
        bad_line, codes = f"s3://{bucket}/bad sha256={'0' * 64}", {"WrongChecksum"}
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/good-1", bad_line, f"s3://{bucket}/good-2"])
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    good = {str(cache / bucket / k): b for k, b in bodies.items() if k != "bad"}
    with FileEvents(cache, skip=outside_private(cache)) as events:
        d = daemons(cache, manifest=m, args=["--endpoint-url", proxy.url, "--max-attempts", "3"])
        st = d.wait_until(lambda st: st["objects"]["ready"] + st["objects"]["failed"] == 3,
                          what="every object ready or failed")
        assert st["objects"]["failed"] == 1, st  # the bad one was not published
        with pytest.raises(FetchFailed) as ei:
            resolve(f"s3://{bucket}/bad", cache_dir=cache, timeout=120)
        assert [Path(p).read_bytes() for p in resolve(
            [f"s3://{bucket}/good-1", f"s3://{bucket}/good-2"], cache_dir=cache)] == list(good.values())
    assert ei.value.code in codes, ei.value
    assert [f["code"] for f in st["failures"]] == [ei.value.code]
    if fault == "flip-every-get":
        assert proxy.faults["flip"] == proxy.gets(f"/{bucket}/bad") >= 3  # every attempt was damaged
    # The watcher saw the good files land, with their bytes (so it was watching) ...
    assert {s.path for s in events.files} == set(good), [s.path for s in events.files if s.path not in good]
    assert all(s.data == good[s.path] for s in events.files if s.data is not None)
    assert {s.path for s in events.files if s.data is not None} == set(good)
    # ... and nothing of the bad object's, anywhere outside the private dir, then or now.
    bad = hashlib.sha256(bodies["bad"]).digest()
    for dirpath, _, names in os.walk(cache):
        for name in names:
            p = os.path.join(dirpath, name)
            if not outside_private(cache)(p):
                assert p in good and hashlib.sha256(Path(p).read_bytes()).digest() != bad, p


def test_every_ranged_get_carries_if_match_or_its_version(tmp_path, s3, bucket, proxy, daemons):
    """Every GET of a part after the first carries If-Match with the ETag the first answer gave, or, for
    an entry pinned to a version, that versionId: seen at the proxy, header by header."""
    body = os.urandom(4 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="big", Body=body)
    etag = s3.head_object(Bucket=bucket, Key="big")["ETag"].strip('"')
    vb = bucket + "-v"
    s3.create_bucket(Bucket=vb)
    s3.put_bucket_versioning(Bucket=vb, VersioningConfiguration={"Status": "Enabled"})
    vbody = os.urandom(3 * MiB + 7)
    vid = s3.put_object(Bucket=vb, Key="ver", Body=vbody)["VersionId"]
    s3.put_object(Bucket=vb, Key="ver", Body=b"a later version, not the one asked for")
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/big", f"s3://{vb}/ver version={vid}"])
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--part-size", "1M", "--prefetch-part-size", "1M"])
    d.wait_until(lambda st: st["objects"]["ready"] == 2, what="both objects ready")
    assert [Path(p).read_bytes() for p in resolve([f"s3://{bucket}/big", f"s3://{vb}/ver"],
                                                  cache_dir=d.cache_dir)] == [body, vbody]
    later = [x for x in proxy.seen(f"/{bucket}/big") if not x.headers["range"].startswith("bytes=0-")]
    assert len(later) == 4, [x.headers.get("range") for x in proxy.seen(f"/{bucket}/big")]
    assert all(x.headers.get("if-match", "").strip('"') == etag for x in later), [x.headers for x in later]
    vgets = proxy.seen(f"/{vb}/ver")
    assert len(vgets) == 4
    assert all(f"versionId={vid}" in x.query for x in vgets), [x.query for x in vgets]


def test_an_object_overwritten_mid_download_gets_a_412_and_starts_over_never_mixed(tmp_path, s3, bucket, proxy,
                                                                                  daemons):
    """The object is overwritten in S3 after its first part was answered and before any other part is
    asked for: the other parts' If-Match gets 412 (seen at the proxy), the fetch starts over from the
    first part, and the reader gets the new object whole. Without If-Match the parts would come from the
    new object and no 412 would be answered."""
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="moving", Body=old)
    path = f"/{bucket}/moving"
    lock, count = threading.Lock(), [0]

    def plan(method: str, p: str, q: str):
        if method == "GET" and p == path:
            with lock:
                count[0] += 1
                if count[0] == 2:  # the first GET of a later part: the first part is answered by now
                    s3.put_object(Bucket=bucket, Key="moving", Body=new)
        return None

    proxy.plan = plan
    d = daemons(args=["--endpoint-url", proxy.url, "--part-size", "1M", "--prefetch-part-size", "1M"])
    got = Path(resolve(f"s3://{bucket}/moving", cache_dir=d.cache_dir, timeout=120)).read_bytes()
    assert got == new
    gets = proxy.seen(path)
    assert proxy.statuses(path)[412] >= 1, [(x.headers.get("range"), x.status) for x in gets]
    first_parts = [i for i, x in enumerate(gets) if x.headers["range"].startswith("bytes=0-")]
    first_412 = next(i for i, x in enumerate(gets) if x.status == 412)
    assert len(first_parts) == 2 and first_parts[0] < first_412 < first_parts[1], \
        [(x.headers.get("range"), x.status) for x in gets]  # started over after the 412
    assert all(x.status == 206 for x in gets[first_parts[1]:])


def test_a_leased_file_survives_eviction_pressure(tmp_path, s3, bucket, proxy, daemons):
    """A file this reader resolved, under a lease far longer than the test, is not evicted when room is
    needed, although it is the policy's first choice without its lease (read already, next needed an
    epoch later, and no longer the reader's current position, while the other residents are prefetched
    and unread). Another reader demands three objects outside the manifest in a full cache: asserted by
    its inode (never evicted and fetched again), by the proxy (fetched once) and by the evictions counted
    (the pressure was real)."""
    size = 300 * KiB
    uris = []
    for i in range(8):
        s3.put_object(Bucket=bucket, Key=f"e/{i:02d}", Body=bytes([i]) * size)
        uris.append(f"s3://{bucket}/e/{i:02d}")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"z/{i}", Body=bytes([100 + i]) * size)
    m = write_manifest(tmp_path / "m.txt", uris)
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--max-size", str(5 * size), "--lease", "3600",
                                  "--workers", "1"])
    d.wait_until(lambda st: st["prefetch_paused"] and st["objects"]["ready"] == 5 and st["objects"]["fetching"] == 0,
                 what="prefetch to fill the cache with the first five entries and pause")
    held = Path(resolve(uris[0], cache_dir=d.cache_dir, timeout=120))
    resolve(uris[1], cache_dir=d.cache_dir, timeout=120)  # the reader moves on: e/00 is held by its lease alone
    d.wait_until(lambda st: st["hits"] >= 2, what="the usage notes of both reads")
    ino = held.stat().st_ino
    demand = ("import sys; from s3cache import resolve\n"
              "for i in range(3):\n"
              "    p = resolve(f's3://{sys.argv[2]}/z/{i}', cache_dir=sys.argv[1], timeout=120)\n"
              "    assert open(p, 'rb').read() == bytes([100 + i]) * %d\n" % size)
    r = subprocess.run([sys.executable, "-c", demand, str(d.cache_dir), bucket], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    st = d.status()
    assert st["evicted"] >= 3, st
    assert held.stat().st_ino == ino and held.read_bytes() == bytes([0]) * size
    assert proxy.gets(f"/{bucket}/e/00") == 1


def test_resolve_returns_only_once_the_verified_file_is_there(tmp_path, s3, bucket, daemons, moto):
    """resolve() of an object on its way does not return while its download is held mid-body at the
    proxy (established at the proxy, not guessed from a delay), and returns the complete file once it
    lands."""
    body = os.urandom(2 * MiB)
    s3.put_object(Bucket=bucket, Key="slow", Body=body)
    with FaultProxy(moto.port, stall_seconds=600) as proxy:
        proxy.plan = lambda m, p, q: "stall" if m == "GET" and not proxy.release.is_set() else None
        d = daemons(args=["--endpoint-url", proxy.url])
        got: list = []
        t = threading.Thread(target=lambda: got.append(resolve(f"s3://{bucket}/slow", cache_dir=d.cache_dir,
                                                               timeout=300)))
        t.start()
        try:
            wait_for(lambda: any(x.status in (200, 206) and not x.done for x in proxy.seen(f"/{bucket}/slow")),
                     120, "the download to be under way, its body held")
            assert got == [] and t.is_alive(), "resolve returned while the file was still on its way"
        finally:
            proxy.release.set()
            t.join(300)
    [p] = got
    assert Path(p).read_bytes() == body


def test_nothing_is_created_outside_the_cache_root_for_any_key(tmp_path, s3, bucket, daemons):
    """Hostile keys (``..`` segments, absolute paths, backslashes, control characters) fetched by the real
    daemon: every file and directory event under the cache root's parent is inside the root (or is the
    test's own manifest and log). The store's walk is checked for arbitrary keys, before and after
    publishing, by tests/test_store.py::test_nothing_is_created_outside_the_root_before_or_after_publishing
    (hypothesis); this is the same guarantee where a user meets it."""
    keys = ["../../etc/passwd", "a/../../../escape", "../../../../up4", "/abs/path", "back\\slash",
            "ctl\x01chars", "plain"]
    bodies = {k: os.urandom(100) for k in keys}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    box = tmp_path / "box"
    cache = box / "deeper" / "cache"
    cache.mkdir(parents=True)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{quote(k, safe='/')}" for k in keys])
    root = str(cache) + os.sep
    with FileEvents(tmp_path, read=False) as events:
        d = daemons(cache, manifest=m)
        d.wait_until(lambda st: st["objects"]["ready"] == len(keys), what="every hostile key ready")
        got = {k: resolve(f"s3://{bucket}/{k}", cache_dir=cache) for k in keys}
    for k, p in got.items():
        assert os.path.realpath(p).startswith(root) and Path(p).read_bytes() == bodies[k]
    ours = {str(m)} | {str(p) for p in tmp_path.glob("daemon-*.log")}
    outside = [p for p in events.paths() | set(events.dirs) if not p.startswith(root) and p not in ours]
    assert outside == [], outside
    assert any(p.startswith(root + bucket + os.sep) for p in events.paths())  # the watcher saw the files land
