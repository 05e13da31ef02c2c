"""The daemon's systemd wiring, end to end: READY=1 after the control socket answers, STATUS= progress,
WATCHDOG=1, SIGHUP reload of configuration and manifest, STOPPING=1.

A real daemon runs with $NOTIFY_SOCKET pointing at a datagram socket this test bound, as systemd would.
"""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest
from conftest import write_manifest

from s3cache.testing import DaemonProcess, wait_for

PROGRESS = re.compile(r"^(\d+)/(\d+) objects, .+ of .+, .+/s$")


class Manager:
    """systemd's end of $NOTIFY_SOCKET: collects every datagram the daemon sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.path = path
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 60) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        msg = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.messages.append(msg)
        return msg

    def until(self, cond, timeout: float = 120, on_each=None) -> dict[str, str]:
        def one():
            msg = self.next(timeout)
            if on_each:
                on_each(msg)
            return msg if cond(msg) else None
        return wait_for(one, timeout, "a notify message")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path):
    m = Manager(str(tmp_path / "notify.sock"))
    yield m
    m.close()


def test_ready_status_watchdog_reload_and_stop_over_notify_socket(tmp_path, moto, s3, bucket, manager):
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"a/{i}", Body=bytes([i]) * 100_000)
    s3.put_object(Bucket=bucket, Key="b/0", Body=b"b" * 1000)
    m1 = write_manifest(tmp_path / "m1.txt", [f"s3://{bucket}/a/{i}" for i in range(3)])
    m2 = write_manifest(tmp_path / "m2.txt", [f"s3://{bucket}/a/{i}" for i in range(3)] + [f"s3://{bucket}/b/0"])
    conf = tmp_path / "config.toml"
    conf.write_text(f'manifest = "{m1}"\nmax_size = "1G"\n')
    d = DaemonProcess(tmp_path / "cache", moto.url, args=["--config", str(conf)], log_path=tmp_path / "d.log",
                      env={"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "2000000"})
    d.start(wait=False)
    try:
        # READY=1 only once the control socket answers (reconciled, index and manifest loaded).
        def control_answers_at_ready(msg):
            if msg.get("READY") == "1":
                assert d._ready(), "READY=1 before the control socket answers"
        manager.until(lambda m: m.get("READY") == "1", on_each=control_answers_at_ready)
        assert d.status()["manifest_entries"] == 3
        # STATUS= progress lines, up to all three objects.
        manager.until(lambda m: (p := PROGRESS.match(m.get("STATUS", ""))) and p.groups() == ("3", "3"))
        # Keep-alives at half of WATCHDOG_USEC, from the daemon's main loop.
        manager.until(lambda m: m.get("WATCHDOG") == "1")
        manager.until(lambda m: m.get("WATCHDOG") == "1")
        # SIGHUP: the file names another manifest and another max size; both take effect, same process.
        pid = d.proc.pid
        conf.write_text(f'manifest = "{m2}"\nmax_size = "2G"\n')
        os.kill(pid, signal.SIGHUP)
        reloading = manager.until(lambda m: m.get("RELOADING") == "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        manager.until(lambda m: m.get("READY") == "1")
        st = d.wait_until(lambda st: st["objects"]["ready"] == 4)
        assert st["bytes"]["max"] == 2 << 30 and st["manifest"] == str(m2) and st["pid"] == pid
        # A bad configuration on reload keeps the running settings and says why.
        conf.write_text('max_size = "lots"\n')
        os.kill(pid, signal.SIGHUP)
        manager.until(lambda m: "max_size" in m.get("STATUS", "") and "not a size" in m.get("STATUS", ""))
        assert d.status()["bytes"]["max"] == 2 << 30 and d.proc.poll() is None
        # SIGTERM: STOPPING=1, then exit 0.
        d.proc.send_signal(signal.SIGTERM)
        manager.until(lambda m: m.get("STOPPING") == "1")
        assert d.proc.wait(60) == 0
    finally:
        d.stop()
