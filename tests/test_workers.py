"""The workers (s3cache/workers.py) with a real fetcher against moto's S3 server, a real space and
schedule: each outcome of a fetch goes where it belongs."""

from __future__ import annotations

import threading
import time

import pytest
from parts import Rig, catalog, entry

from s3cache.daemon.workers import Workers
from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.testing import wait_for


@pytest.fixture
def rig(tmp_path, moto):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    client = make_client(moto.url, "us-east-1", pool=4, connect_timeout=5, read_timeout=10)
    r.fetcher = Fetcher(client, part_size=1 << 20, prefetch_part_size=1 << 20, workers=1, max_attempts=2,
                        cancel=r.stopping, new_temp=r.store.new_temp, discard=r.store.discard)
    r.to_publish, r.failures = [], []

    def fail(uri: str, code: str, message: str) -> None:  # as daemon.py composes it
        r.failures.append((uri, code))
        with r.cond:
            r.schedule.fail(uri, code, message)
            r.space.release(uri)

    r.workers = Workers(r.s, r.schedule, r.space, r.fetcher, r.cond, is_waited=r.readers.is_waited,
                        publish=lambda e, f: r.to_publish.append((e, f)), fail=fail)
    r.thread = threading.Thread(target=r.workers.run)
    yield r
    r.stopping.set()
    with r.cond:
        r.cond.notify_all()
    if r.thread.ident is not None:
        r.thread.join(timeout=30)
    r.fetcher.close()
    r.close()


def test_each_outcome_goes_where_it_belongs(rig, s3, bucket):
    s3.put_object(Bucket=bucket, Key="ok", Body=b"o" * 100)
    s3.put_object(Bucket=bucket, Key="big", Body=b"b" * 900)
    u = f"s3://{bucket}/"
    rig.install(catalog(entry(u + "ok"), entry(u + "missing"), entry(u + "huge", 5000), entry(u + "big")))
    rig.cached("s3://other-bucket/filler", b"f" * 200)  # leased below, so it cannot make room for big
    with rig.cond:
        rig.space.touch("s3://other-bucket/filler", time.time(), "reader-1")
    rig.thread.start()
    wait_for(lambda: len(rig.to_publish) == 1 and len(rig.failures) == 2 and u + "big" in rig.schedule.blocked,
             60, "every job to end")
    [(e, fetched)] = rig.to_publish
    assert e.uri == u + "ok" and fetched.size == 100
    assert rig.space.reservations[u + "ok"] == 100  # held until the publisher commits it
    assert sorted(rig.failures) == [(u + "huge", "TooLarge"), (u + "missing", "NoSuchKey")]
    assert rig.schedule.fetching == {u + "ok"}  # the publisher takes it out
    assert rig.schedule.prefetch_paused and rig.space.size_hint(u + "big") == 900
    assert rig.space.reserved == 100  # big's attempt left no reservation behind
