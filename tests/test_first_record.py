"""The first record in a second: a reader's object starts at once whatever prefetch is doing, and the
first files a job opens come over many connections, each shown from the proxy's request timeline (what
reached S3 and when), never from a clock in the test."""

from __future__ import annotations

import os

from conftest import write_manifest

from s3cache import resolve
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

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
