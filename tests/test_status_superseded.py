"""While the refetch of an object verify found changed in S3 is pending, status shows it as fetching (not
ready: its old copy is never handed out), and a reader's want for it counts as a miss. Real daemon, moto,
the refetch held at a fault proxy (a condition, not a sleep)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from click.testing import CliRunner
from conftest import write_manifest

from s3cache import resolve
from s3cache.cli import main
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1024


def test_a_superseded_object_awaiting_its_refetch_is_fetching_and_a_want_for_it_a_miss(tmp_path, s3, bucket,
                                                                                       daemons, moto):
    proxy = FaultProxy(moto.port, stall_seconds=600).start()
    armed = threading.Event()
    proxy.plan = lambda m, p, q: ("stall" if m == "GET" and p == f"/{bucket}/a" and armed.is_set()
                                  and not proxy.release.is_set() else None)
    try:
        a, b = f"s3://{bucket}/a", f"s3://{bucket}/b"
        for key in ("a", "b"):
            s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(100 * KiB))
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", [a, b]), args=["--endpoint-url", proxy.url])
        d.wait_until(lambda st: st["objects"]["ready"] == 2)
        new = os.urandom(120 * KiB)
        s3.put_object(Bucket=bucket, Key="a", Body=new)
        armed.set()
        r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", a])
        assert r.exit_code == 0 and "1 changed in S3" in r.output, r.output
        wait_for(lambda: proxy.faults["stall"] >= 1, 60, "the refetch of a in flight, held at the proxy")
        st = d.status()
        assert st["objects"] == {"queued": 0, "fetching": 1, "ready": 1, "failed": 0}, st["objects"]
        assert st["misses"] == 0
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(Path(resolve([a], cache_dir=d.cache_dir,
                                                                    timeout=120)[0]).read_bytes()), daemon=True)
        t.start()
        d.wait_until(lambda st: st["waiting"] == 1, 60, "resolve() waiting for the new version")
        assert d.status()["misses"] == 1  # the old copy is not handed out: a miss, not a hit
        proxy.release.set()
        t.join(120)
        assert got == [new]
        d.wait_until(lambda st: st["objects"] == {"queued": 0, "fetching": 0, "ready": 2, "failed": 0}, 60,
                     "the new version ready")
    finally:
        proxy.release.set()
        proxy.stop()
