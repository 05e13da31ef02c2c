"""A SIGHUP that makes ``--max-size`` smaller evicts down to it at once, through the real daemon's reload
(``Reload.reload`` then ``Space.fit_max_size``), not at the next admission: with everything cached and
nothing left to fetch, no admission would ever come."""

from __future__ import annotations

import signal

from conftest import write_manifest

from s3cache.testing import DaemonProcess, wait_for
from s3cache.testing.faultproxy import FaultProxy


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


def test_downloads_in_flight_when_max_size_shrinks_are_evicted_down_to_it_at_the_next_sighup(tmp_path, moto, s3,
                                                                                             bucket):
    # Downloads admitted under the old --max-size cannot be evicted while in flight; they land above the
    # new one. The next SIGHUP, with --max-size unchanged, must evict down to it (found by the model).
    uris = []
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"o{i}", Body=bytes([65 + i]) * 500_000)
        uris.append(f"s3://{bucket}/o{i}")
    proxy = FaultProxy(moto.port, stall_seconds=600).start()
    proxy.plan = lambda m, p, q: "stall" if m == "GET" and not proxy.release.is_set() else None
    m = write_manifest(tmp_path / "m.txt", uris)
    conf = tmp_path / "config.toml"
    conf.write_text(f'manifest = "{m}"\nmax_size = "2M"\nmin_free = 0\n')
    # botocore's GETs: they are admitted at the answer's headers, and the proxy holds the body after them.
    # The CRT (small prefetch) hands the daemon the headers only with the whole first answer, so a body
    # held at the proxy is never admitted, and a download is admitted only as it lands.
    d = DaemonProcess(tmp_path / "cache", proxy.url, args=["--config", str(conf), "--transport", "botocore"],
                      log_path=tmp_path / "d.log")
    try:
        d.start()
        # All three admitted (their room reserved) and held: a GET the proxy counts is not enough, as a
        # download not yet admitted when --max-size shrinks would then wait for room instead (a run under
        # a CPU hog saw that).
        d.wait_until(lambda st: st["bytes"]["reserved"] == 3 * 500_000 and proxy.faults["stall"] >= 3,
                     timeout=60, what="all three downloads admitted, held at the proxy")
        conf.write_text(f'manifest = "{m}"\nmax_size = "1M"\nmin_free = 0\n')
        d.proc.send_signal(signal.SIGHUP)
        d.wait_until(lambda st: st["bytes"]["max"] == 1 << 20, timeout=60, what="the smaller --max-size applied")
        proxy.release.set()
        st = d.wait_until(lambda st: st["objects"]["ready"] == 3, timeout=60, what="the three downloads landed")
        assert st["bytes"]["ready"] > 1 << 20  # above the bound: they were admitted under the old one
        d.proc.send_signal(signal.SIGHUP)  # the same settings again (a ConfigMap resync)
        st = d.wait_until(lambda st: st["bytes"]["ready"] <= 1 << 20, timeout=60,
                          what="the ready bytes within --max-size after the next reload")
        assert st["objects"]["ready"] == 2 and st["evicted"] == 1, st["objects"]
    finally:
        proxy.release.set()
        try:
            assert d.stop() == 0
        finally:
            proxy.stop()
