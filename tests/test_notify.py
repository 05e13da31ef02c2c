"""sd_notify over a real AF_UNIX datagram socket bound by the test, as systemd binds $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from s3cache.service import notify


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A socket in systemd's place; ``manager()`` returns the next datagram as a dict, or None."""
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    def receive(timeout: float | None = 30.0) -> dict | None:
        s.settimeout(timeout)
        try:
            data = s.recv(65536)
        except (BlockingIOError, socket.timeout):
            return None
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    receive.path = path
    yield receive
    s.close()


def test_ready_status_stopping_watchdog(manager):
    assert notify.ready("412/1000 objects, 31.2 GiB of 80 GiB, 1.9 GB/s")
    assert manager() == {"READY": "1", "STATUS": "412/1000 objects, 31.2 GiB of 80 GiB, 1.9 GB/s"}
    assert notify.status("reconciling") and manager() == {"STATUS": "reconciling"}
    assert notify.watchdog() and manager() == {"WATCHDOG": "1"}
    assert notify.stopping() and manager() == {"STOPPING": "1"}
    assert notify.notify(errno=28, status="disk full") and manager() == {"ERRNO": "28", "STATUS": "disk full"}


def test_reloading_carries_the_monotonic_clock(manager):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    msg = manager()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1" and before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_socket_name(monkeypatch):
    name = f"s3cache-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        s.settimeout(30)
        assert s.recv(100) == b"READY=1"


def test_no_socket_is_a_no_op_and_a_dead_socket_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify.ready() is False


def test_a_newline_in_a_value_is_refused(manager):
    with pytest.raises(ValueError, match="STATUS= may not contain a newline"):
        notify.status("one\nREADY=1")
    s = manager(timeout=0)
    assert s is None  # nothing was sent


def test_watchdog_interval_reads_usec_and_pid():
    me = str(os.getpid())
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 60.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_kicks_at_most_once_per_half_interval(manager):
    env = {"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": str(3600 * 10**6)}
    w = notify.Watchdog(env)
    assert w.enabled and w.period == 1800
    assert w.kick() and manager() == {"WATCHDOG": "1"}
    assert not w.kick() and manager(timeout=0) is None  # within the half hour: nothing sent
    w = notify.Watchdog({**env, "WATCHDOG_USEC": "2"})  # a period of one microsecond
    assert w.kick() and w.kick()
    assert manager() == {"WATCHDOG": "1"} and manager() == {"WATCHDOG": "1"}
    off = notify.Watchdog({"NOTIFY_SOCKET": manager.path})
    assert not off.enabled and not off.kick() and manager(timeout=0) is None


def test_a_child_process_finds_the_socket_in_its_environment(manager):
    code = "from s3cache.service import notify; import sys; sys.exit(0 if notify.ready('up') else 1)"
    r = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), timeout=60)
    assert r.returncode == 0
    assert manager() == {"READY": "1", "STATUS": "up"}


def test_progress_line(manager):
    line = notify.progress_line(412, 1000, int(31.2 * 2**30), 80 * 2**30, 1.9 * 2**30)
    assert line == "412/1000 objects, 31.2 GiB of 80.0 GiB, 1.9 GiB/s"
    assert notify.progress_line(0, 3, 0, None, 0) == "0/3 objects, 0 B, 0 B/s"
    assert notify.status(line) and manager() == {"STATUS": line}
