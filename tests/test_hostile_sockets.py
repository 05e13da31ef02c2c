"""Local clients that misbehave on the daemon's sockets, against the real daemon: one that stops reading,
a flood of idle connections under a low descriptor limit, garbage on both sockets. Each may lose its own
connection; the daemon serves everyone else and no thread of it dies."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import socket
import termios

from s3cache import resolve
from s3cache.errors import ProtocolError
from s3cache.sockets.control import Client
from s3cache.store.files import Layout
from s3cache.testing import wait_for

KiB = 1 << 10


def sockets_of(d) -> tuple[str, str]:
    lay = Layout(str(d.cache_dir.absolute()))
    return lay.control_socket, lay.use_socket


def assert_log_clean(d) -> None:
    log = d.log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-3000:]


def test_a_reader_that_stops_reading_does_not_freeze_the_daemon(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="cached", Body=b"c" * KiB)
    s3.put_object(Bucket=bucket, Key="later", Body=b"l" * KiB)
    d = daemons(args=["--workers", "8"])
    cached = resolve(f"s3://{bucket}/cached", cache_dir=d.cache_dir, timeout=120)
    ctl, _ = sockets_of(d)
    # Long keys that do not exist: every answer and every "failed" event is about 1 KiB.
    deep = "/".join(["k" * 200] * 4)
    missing = [f"s3://{bucket}/missing/{deep}/{i:04d}" for i in range(1000)]
    stuck = socket.socket(socket.AF_UNIX)
    stuck.connect(ctl)
    for i in range(0, len(missing), 500):
        stuck.sendall(json.dumps({"op": "want", "reader": "stuck", "uris": missing[i : i + 500]}).encode() + b"\n")
    # It never reads. The daemon fails all thousand objects, with nowhere to write the news.
    d.wait_until(lambda st: st["objects"]["failed"] >= 1000, what="the thousand missing objects to fail")
    unread = fcntl.ioctl(stuck, termios.FIONREAD, b"\0\0\0\0")
    assert int.from_bytes(unread, "little") >= 150 * KiB  # its socket buffer is full: writes would block
    # Everyone else is served: a cached file, a missing one, status.
    assert open(resolve(f"s3://{bucket}/cached", cache_dir=d.cache_dir, timeout=60), "rb").read() == b"c" * KiB
    assert resolve(f"s3://{bucket}/cached", cache_dir=d.cache_dir, timeout=60) == cached
    assert open(resolve(f"s3://{bucket}/later", cache_dir=d.cache_dir, timeout=60), "rb").read() == b"l" * KiB
    assert d.status()["objects"]["ready"] == 2
    stuck.close()
    assert_log_clean(d)


def test_the_daemon_accepts_again_after_running_out_of_descriptors(tmp_path, daemons):
    d = daemons()
    ctl, _ = sockets_of(d)
    pid = d.proc.pid
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_now + 16, hard))
    flood = []
    for _ in range(100):  # idle clients: more than the daemon has descriptors for, fewer than its backlog
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(ctl)
        flood.append(s)
    limit = open_now + 16
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) >= limit - 1, 60, "the daemon to run out of descriptors")
    for s in flood:
        s.close()

    def served() -> bool:
        try:
            with Client(ctl, str(d.cache_dir), timeout=5) as c:
                return bool(c.request({"op": "hello"}).get("ok"))
        except Exception:
            return False

    wait_for(served, 60, "the daemon to answer again once the idle clients left")
    assert d.status()["pid"] == pid
    assert "Too many open files" in d.log()  # accept() did fail, and said so
    assert_log_clean(d)


def test_garbage_on_the_control_socket_costs_only_that_connection(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"k" * KiB)
    d = daemons()
    uri = f"s3://{bucket}/k"
    resolve(uri, cache_dir=d.cache_dir, timeout=120)
    ctl, _ = sockets_of(d)
    with Client(ctl, str(d.cache_dir), timeout=60) as c:
        for line, code in [(b"[" * 200_000, "BadRequest"), (b'{"op": "\xff"}', "BadRequest"),
                           (b'"want"', "BadRequest"),
                           (json.dumps({"op": "want", "uris": [uri] * 5000}).encode(), "TooMany"),
                           (json.dumps({"op": "want", "uris": [uri], "ahead": [uri] * 5000}).encode(), "TooMany")]:
            c.sock.sendall(line + b"\n")
            try:
                c.receive()
                raise AssertionError(f"no error for {line[:40]!r}")
            except ProtocolError as e:
                assert getattr(e, "code", None) == code, (line[:40], e)
        assert c.request({"op": "hello"})["ok"]  # the same connection serves on
    with Client(ctl, str(d.cache_dir), timeout=60) as c:
        try:
            c.sock.sendall(b"x" * (2 << 20))  # a line over the limit, never ended
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the daemon before the last bytes went: its answer is waiting all the same
        try:
            c.receive()
            raise AssertionError("no error for an overlong line")
        except ProtocolError as e:
            assert getattr(e, "code", None) == "TooLarge"
    assert_log_clean(d)


def test_garbage_on_the_usage_socket_is_skipped_and_counting_goes_on(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"k" * KiB)
    d = daemons()
    uri = f"s3://{bucket}/k"
    resolve(uri, cache_dir=d.cache_dir, timeout=120)
    ctl, use = sockets_of(d)
    for junk in [b"Rjunk\0\xff\xfe\0", b"?what\0", b"h\xc3\x28\0", b"hs3://never-terminated",
                 b"Rbig\0h" + b"a" * (64 * KiB)]:
        s = socket.socket(socket.AF_UNIX)
        s.connect(use)
        s.sendall(junk)
        s.close()
    # The usage loop still runs: hits from the fast path keep being counted.
    before = d.status()["hits"]
    for _ in range(3):
        resolve(uri, cache_dir=d.cache_dir, timeout=60)
    d.wait_until(lambda st: st["hits"] >= before + 3, 60, "the three hits to be counted")
    with Client(ctl, str(d.cache_dir), timeout=60) as c:
        assert c.request({"op": "hello"})["ok"]
    assert_log_clean(d)
