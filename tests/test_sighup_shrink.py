"""A SIGHUP that makes ``--max-size`` smaller evicts down to it at once, through the real daemon's reload
(``Reload.reload`` then ``Space.fit_max_size``), not at the next admission: with everything cached and
nothing left to fetch, no admission would ever come."""

from __future__ import annotations

import signal

from conftest import write_manifest

from s3cache.testing import DaemonProcess


def test_a_smaller_max_size_evicts_down_to_it_when_sighup_applies_it(tmp_path, moto, s3, bucket):
    uris = []
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"o{i}", Body=bytes([65 + i]) * 500_000)
        uris.append(f"s3://{bucket}/o{i}")
    m = write_manifest(tmp_path / "m.txt", uris)
    conf = tmp_path / "config.toml"
    conf.write_text(f'manifest = "{m}"\nmax_size = "2M"\nmin_free = 0\n')
    d = DaemonProcess(tmp_path / "cache", moto.url, args=["--config", str(conf)], log_path=tmp_path / "d.log")
    d.start()
    try:
        d.wait_until(lambda st: st["objects"]["ready"] == 3, what="every object prefetched")
        conf.write_text(f'manifest = "{m}"\nmax_size = "1M"\nmin_free = 0\n')
        d.proc.send_signal(signal.SIGHUP)
        st = d.wait_until(lambda st: st["bytes"]["max"] == 1 << 20 and st["bytes"]["ready"] <= 1 << 20,
                          timeout=60, what="the ready bytes within the smaller --max-size")
        assert st["objects"]["ready"] == 2 and st["evicted"] == 1, st["objects"]
    finally:
        assert d.stop() == 0
