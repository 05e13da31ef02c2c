"""A failure counts only against the manifest entry its fetch used (issue 26.6): manifest v1 has a wrong
``sha256=``, v2 with the right one is installed while v1's download is in flight; v1's WrongChecksum is
not charged to v2, whose object is fetched again and served."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import write_manifest

from s3cache import resolve
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy


@pytest.fixture
def stalling_proxy(moto):
    p = FaultProxy(moto.port, stall_seconds=600).start()
    yield p
    p.release.set()
    p.stop()


def test_a_failure_under_the_old_entry_is_not_charged_to_the_corrected_one(tmp_path, s3, bucket, daemons,
                                                                           stalling_proxy):
    body = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="x", Body=body)
    proxy = stalling_proxy
    proxy.plan = lambda m, p, q: "stall" if m == "GET" and p.endswith("/x") and not proxy.release.is_set() else None
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/x sha256={'0' * 64}"])
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url])
    wait_for(lambda: [x for x in proxy.seen(f"/{bucket}/x") if x.fault == "stall" and not x.done], 60,
             "v1's download held at the proxy")
    write_manifest(m, [f"s3://{bucket}/x sha256={hashlib.sha256(body).hexdigest()}"])
    wait_for(lambda: d.log().count(f"manifest {m}: ") >= 2, 60, "v2 installed while v1's download is in flight")
    proxy.release.set()  # v1's download ends: its bytes do not match v1's sha256
    st = d.wait_until(lambda st: st["objects"]["ready"] == 1 or st["objects"]["failed"], timeout=60,
                      what="the object served, or failed")
    assert st["objects"]["failed"] == 0 and st["objects"]["ready"] == 1, st["failures"]
    assert "WrongChecksum" in d.log()  # v1's fetch did fail, and was charged to v1 only
    assert Path(resolve([f"s3://{bucket}/x"], cache_dir=d.cache_dir, timeout=60)[0]).read_bytes() == body
