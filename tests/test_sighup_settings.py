"""SIGHUP's live settings reach every part that uses them (issue 26.7), not only the settings object:
the space (``max_size``, ``min_free``), the leases that copied ``lease`` and their budget (a share of
``max_size``), the workers (``max_size``: what can never fit), and the log level. A reload that reached
only the space, or applied only the manifest and ``max_size``, fails here."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import write_manifest

from s3cache import resolve
from s3cache.errors import S3CacheError
from s3cache.testing import DaemonProcess, wait_for


def test_every_live_setting_reaches_its_user(tmp_path, moto, s3, bucket):
    s3.put_object(Bucket=bucket, Key="a", Body=b"a" * 100_000)
    s3.put_object(Bucket=bucket, Key="c", Body=b"c" * 100_000)
    s3.put_object(Bucket=bucket, Key="big", Body=b"b" * (2 << 20))
    m1 = write_manifest(tmp_path / "m1.txt", [f"s3://{bucket}/a"])
    m2 = write_manifest(tmp_path / "m2.txt", [f"s3://{bucket}/a", f"s3://{bucket}/c"])
    conf = tmp_path / "config.toml"
    conf.write_text(f'manifest = "{m1}"\nmax_size = "8M"\nlease = 600\nmin_free = 0\nlog_level = "info"\n')
    d = DaemonProcess(tmp_path / "cache", moto.url, args=["--config", str(conf)], log_path=tmp_path / "d.log",
                      env={"S3CACHE_ALLOW": "s3://"})
    d.start()
    try:
        d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the first manifest's object")
        resolve([f"s3://{bucket}/a"], cache_dir=d.cache_dir, timeout=60)
        st = d.wait_until(lambda st: st["leases"]["files"] == 1, what="the reader's lease")
        assert st["leases"]["budget"] == (8 << 20) // 32 and st["bytes"]["max"] == 8 << 20

        conf.write_text(f'manifest = "{m2}"\nmax_size = "1M"\nlease = 1\nmin_free = 0.999\nlog_level = "debug"\n')
        mark = len(d.log())
        d.proc.send_signal(signal.SIGHUP)
        st = d.wait_until(lambda st: st["manifest_entries"] == 2, what="the reload")
        assert st["bytes"]["max"] == 1 << 20  # the space
        assert st["leases"]["budget"] == (1 << 20) // 32  # the leases' budget, copied at start
        d.wait_until(lambda st: st["leases"]["files"] == 0, timeout=30,
                     what="the one-second lease to end (the leases copied 600 s at start)")
        d.wait_until(lambda st: st["min_free_reached"], timeout=30, what="prefetch of c paused by min_free")
        assert d.status()["objects"]["ready"] == 1
        # The workers judge what can never fit by the new max_size: TooLarge, not "wait for room".
        with pytest.raises(S3CacheError):
            resolve([f"s3://{bucket}/big"], cache_dir=d.cache_dir, timeout=60)
        st = d.wait_until(lambda st: st["failures"], what="the big object's failure")
        assert [f["code"] for f in st["failures"]] == ["TooLarge"], st["failures"]
        # The log level: an event that changes nothing is logged at debug only.
        t = os.stat(m2)
        os.utime(m2, ns=(t.st_atime_ns, t.st_mtime_ns))
        wait_for(lambda: " DEBUG " in d.log()[mark:], 30, "a debug line after the reload")
    finally:
        assert d.stop() == 0
