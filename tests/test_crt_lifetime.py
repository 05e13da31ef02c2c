"""What the CRT path gives back (fetch/crt.py): a GET's native request once it has returned, and a closed
fetcher's native client, with its event-loop thread and descriptors. Against moto directly (no
in-process proxy, whose sockets would blur the count), with real CRT GETs."""

from __future__ import annotations

import gc
import os
import threading

import pytest

from s3cache.errors import FetchFailed
from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.fetch.retry import Cancelled
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.testing import wait_for

KiB = 1 << 10


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def native_threads() -> int:
    """Every thread of this process, the CRT's event loops included (``threading`` does not see those)."""
    return len(os.listdir("/proc/self/task"))


def crt_requests() -> int:
    from awscrt.s3 import S3Request

    gc.collect()
    return sum(isinstance(o, S3Request) for o in gc.get_objects())


def make_fetcher(moto, store) -> Fetcher:
    return Fetcher(make_client(moto.url, "us-east-1", 16, 5, 10), part_size=1 << 20, workers=2, max_attempts=1,
                   cancel=threading.Event(), new_temp=store.new_temp, discard=store.discard)


def test_a_get_leaves_no_native_request_behind(moto, s3, bucket, store):
    # Each request's native handle held its callbacks and they held it back: a cycle through native code
    # that no collection breaks, ~14 KB of memory per GET for the daemon's life.
    s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(4 * KiB))
    before = crt_requests()
    f = make_fetcher(moto, store)
    try:
        for _ in range(20):
            got = f.fetch(Entry(ObjectRef(bucket, "k"), size=4 * KiB), admit=lambda n: True)
            store.discard(got.tmp_path)
        got = f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)  # unknown size: a ranged GET
        store.discard(got.tmp_path)
        with pytest.raises(FetchFailed):  # a failed one too
            f.fetch(Entry(ObjectRef(bucket, "nope"), size=KiB), admit=lambda n: True)
        assert f.counters.requests == 22
        assert crt_requests() == before
    finally:
        f.close()


def test_closed_fetchers_give_back_the_crts_threads_and_descriptors(moto, s3, bucket, store):
    # Each fetcher's CRT client has an event loop (an epoll, an eventfd and a timerfd per loop, 9 fds and
    # 4 threads a client here): a process making many fetchers (tests, the CLI) kept every one of them.
    s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(4 * KiB))
    fds, threads = open_fds(), native_threads()
    for _ in range(8):
        f = make_fetcher(moto, store)
        got = f.fetch(Entry(ObjectRef(bucket, "k"), size=4 * KiB), admit=lambda n: True)
        assert f.counters.requests == 1
        store.discard(got.tmp_path)
        f.close()
        del f
    # The CRT frees a client's loop on its own threads once its last request is gone: wait for it.
    wait_for(lambda: open_fds() <= fds + 3 and native_threads() <= threads + 1, 60,
             f"the fds ({fds} before) and threads ({threads} before) of 8 closed fetchers to be given back")


def test_a_closed_fetchers_crt_makes_no_new_client(moto, s3, bucket, store, tmp_path):
    f = make_fetcher(moto, store)
    f.close()
    with pytest.raises(Cancelled, match="closed"):
        f.crt.get(bucket, "k", None, str(tmp_path / "never"), KiB, KiB)
    assert f.crt._native is None and not (tmp_path / "never").exists()
