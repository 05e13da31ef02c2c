"""Issue 19: a ResolveTimeout says what the daemon knows about the file (the ``explain`` op), and a
failure inside ``s3cache.tf.files`` carries the S3 error code and the URI. Real daemon, real S3 server."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest
from conftest import write_manifest

from s3cache import ResolveTimeout, resolve
from s3cache.store.layout import Layout
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1 << 10


def _three_files_two_fit(tmp_path, s3, bucket, daemons, prefix: str):
    """Three 64 KiB objects behind a 128 KiB cache whose leases last 10 minutes: once a reader holds
    two, the third has no room. Returns the daemon and the three URIs."""
    uris = []
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{i}", Body=os.urandom(64 * KiB))
        uris.append(f"s3://{bucket}/{prefix}/{i}")
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris),
                args=["--max-size", str(128 * KiB), "--lease", "600", "--min-free", "0"])
    return d, uris


def _explained_once_refused_room(d, uri: str, queued: str | None = None) -> str:
    """The timeout message for ``uri`` once a worker has tried to admit it (under load it may still be
    queued at first; ``queued``, when given, is what the message must say meanwhile)."""
    for _ in range(10):
        with pytest.raises(ResolveTimeout) as e:
            resolve(uri, cache_dir=d.cache_dir, timeout=2)
        msg = str(e.value)
        if "waiting for space" in msg:
            break
        if queued is not None:
            assert queued in msg, msg
    return msg


def test_a_timeout_on_a_stalled_download_says_it_is_fetching(tmp_path, s3, bucket, moto, daemons):
    s3.put_object(Bucket=bucket, Key="slow", Body=os.urandom(64 * KiB))
    stalled = []
    plan = lambda m, path, q: (stalled.append(path) or "stall") if m == "GET" and path.endswith("/slow") else None  # noqa: E731
    with FaultProxy(moto.port, plan, stall_seconds=30) as proxy:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/slow"]),
                    args=["--endpoint-url", proxy.url, "--read-timeout", "60", "--max-attempts", "1"])
        wait_for(lambda: stalled, 60, "the prefetch's GET to stall")
        with pytest.raises(ResolveTimeout) as e:
            resolve(f"s3://{bucket}/slow", cache_dir=d.cache_dir, timeout=1)
        assert f"s3://{bucket}/slow: fetching, one of 1 download(s) in flight" in str(e.value)
        d.kill()


def test_a_timeout_behind_leased_files_says_who_holds_the_space(tmp_path, s3, bucket, daemons):
    d, uris = _three_files_two_fit(tmp_path, s3, bucket, daemons, "l")
    resolve(uris[:2], cache_dir=d.cache_dir, timeout=120)  # both leased: nothing may be evicted
    msg = _explained_once_refused_room(d, uris[2], queued=f"first {uris[2]}: queued behind 0 other file(s)")
    assert (f"first {uris[2]}: waiting for space: 128.0 KiB of the 128.0 KiB cache in use; eviction may not "
            f"take 128.0 KiB leased by 1 reader(s)") in msg, msg


def test_a_timeout_behind_leases_of_a_reader_that_left_names_who_holds_what(tmp_path, s3, bucket, daemons):
    """Another reader process leased two files and exited: the message counts the readers whose leases
    hold bytes (that one, not every reader the daemon knows, nor none), and names only the reasons that
    hold bytes (it said "leases of N reader(s), 0 B pinned, 0 B reserved" with N the readers known)."""
    d, uris = _three_files_two_fit(tmp_path, s3, bucket, daemons, "x")
    reader = "import sys; from s3cache import resolve; resolve(sys.argv[2:], cache_dir=sys.argv[1], timeout=120)"
    subprocess.run([sys.executable, "-c", reader, str(d.cache_dir), *uris[:2]], check=True, timeout=180)
    msg = _explained_once_refused_room(d, uris[2])
    assert "128.0 KiB of the 128.0 KiB cache in use; eviction may not take " in msg, msg
    assert "leased by 1 reader(s)" in msg and " 0 B " not in msg, msg


def test_a_download_retrying_for_room_is_explained_as_waiting_for_space(tmp_path, s3, bucket, daemons):
    """A reader's object refused room is handed to a worker again (every second while the reader waits)
    and counts as fetching while that worker asks for room again: it was explained as "fetching, one of
    1 download(s)", not as waiting for space. The test holds the worker there: it takes the lease lock
    shared, as a reader does, so the worker's next try at room waits to evict."""
    d, uris = _three_files_two_fit(tmp_path, s3, bucket, daemons, "r")
    resolve(uris[:2], cache_dir=d.cache_dir, timeout=120)  # both leased: nothing may be evicted
    reader = "import sys; from s3cache import resolve; resolve(sys.argv[2], cache_dir=sys.argv[1], timeout=600)"
    waiter = subprocess.Popen([sys.executable, "-c", reader, str(d.cache_dir), uris[2]], stderr=subprocess.DEVNULL)
    fd = os.open(Layout(str(d.cache_dir.absolute())).lease_lock, os.O_RDONLY)
    try:
        d.wait_until(lambda st: any(w["uri"] == uris[2] and w["reader_waits"] for w in st["waiting_for_space"]),
                     what="the reader's object to be refused room")
        fcntl.flock(fd, fcntl.LOCK_SH)  # the worker's next try at room waits for this
        d.wait_until(lambda st: st["objects"]["fetching"] == 1, what="a worker to try for room again")
        with pytest.raises(ResolveTimeout) as e:
            resolve(uris[2], cache_dir=d.cache_dir, timeout=1)
        msg = str(e.value)
        assert f"{uris[2]}: waiting for space: 128.0 KiB of the 128.0 KiB cache in use" in msg, msg
    finally:
        os.close(fd)  # drops the flock
        waiter.kill()
        waiter.wait()
