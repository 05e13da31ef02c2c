"""A daemon that is starting says so (issue 26.1): its control socket opens as soon as it holds the cache
dir, and until it serves, ``status`` (text, --json) and the metrics name the step, a reader's resolve
waits (up to its own timeout) instead of raising DaemonNotRunning, and systemd is sent
EXTEND_TIMEOUT_USEC so a slow start is not killed.

The start is held while it lists the manifest's prefix line, by an S3 endpoint that accepts connections
and answers nothing until the test opens it."""

from __future__ import annotations

import os
import select
import socket
import threading
import urllib.request
from pathlib import Path

from click.testing import CliRunner
from conftest import write_manifest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon_notify import Manager

from s3cache import resolve
from s3cache.cli import main
from s3cache.errors import DaemonNotRunning
from s3cache.sockets.control import Client
from s3cache.store.files import Layout
from s3cache.testing import DaemonProcess, free_port, wait_for


class Gate:
    """An S3 endpoint that accepts connections and answers nothing until ``open`` (as an S3 that accepts
    connections but never answers), then relays each to moto."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._open = threading.Event()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._sock.settimeout(0.2)  # a blocked accept() would not notice the socket closing
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop
                return
            client.settimeout(None)
            t = threading.Thread(target=self._relay, args=(client,))
            self._threads.append(t)
            t.start()

    def _relay(self, client: socket.socket) -> None:
        with client:
            while not self._open.wait(0.1):
                if self._stop.is_set():
                    return
            with socket.create_connection(("127.0.0.1", self._upstream)) as up:
                ends = {client: up, up: client}
                while not self._stop.is_set():
                    ready, _, _ = select.select(list(ends), [], [], 0.2)
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            return
                        ends[s].sendall(data)

    def open(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._sock.close()


def status_now(cache_dir: Path) -> dict | None:
    try:
        with Client(Layout(str(cache_dir.absolute())).control_socket, str(cache_dir), timeout=5) as c:
            return c.request({"op": "status"})["status"]
    except DaemonNotRunning:
        return None


def starting_gauge(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        for fam in text_string_to_metric_families(r.read().decode()):
            for s in fam.samples:
                if s.name == "s3cache_starting":
                    return s.value
    raise AssertionError("no s3cache_starting sample")


def test_a_starting_daemon_says_so_and_a_reader_waits_for_it(tmp_path, moto, s3, bucket, daemons):
    body = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    s3.put_object(Bucket=bucket, Key="p/0", Body=b"p0")
    uri = f"s3://{bucket}/k"
    m = write_manifest(tmp_path / "m.txt", [uri, f"s3://{bucket}/p/"])  # start-up lists p/: held at the gate
    gate = Gate(moto.port)
    port = free_port()
    try:
        d = daemons(manifest=m, args=["--endpoint-url", gate.url, "--read-timeout", "300",
                                      "--metrics-addr", f"127.0.0.1:{port}"], wait=False)
        st = wait_for(lambda: (st := status_now(d.cache_dir)) and st["step"].startswith("reading") and st, 60,
                      "the control socket to answer while the manifest is read")
        assert st["state"] == "starting" and st["step"] == f"reading the manifest {m}", st
        r = CliRunner().invoke(main, ["status", "--cache-dir", str(d.cache_dir)])
        assert r.exit_code == 0 and f"starting    reading the manifest {m}" in r.output, r.output
        r = CliRunner().invoke(main, ["status", "--cache-dir", str(d.cache_dir), "--json"])
        assert r.exit_code == 0 and '"state": "starting"' in r.output
        assert starting_gauge(port) == 1
        assert not d._ready()  # hello: not serving yet

        got: list = []
        reader = threading.Thread(target=lambda: got.append(_resolve(uri, d.cache_dir)))
        reader.start()
        wait_for(lambda: status_now(d.cache_dir)["waiting"] == 1, 60, "the reader to ask and wait")
        gate.open()  # S3 answers: start-up goes on
        reader.join(120)
        assert got and got[0] == body, got
        st = d.wait_until(lambda st: st.get("state") != "starting", what="the daemon to serve")
        assert st["manifest_entries"] == 2 and starting_gauge(port) == 0
        d.stop()
    finally:
        gate.stop()


def _resolve(uri: str, cache_dir: Path):
    try:
        return Path(resolve([uri], cache_dir=cache_dir, timeout=60)[0]).read_bytes()
    except Exception as e:  # the test reports it
        return e


def test_a_starting_daemon_extends_systemds_start_timeout(tmp_path, moto, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"k")
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/k"])
    manager = Manager(str(tmp_path / "notify.sock"))
    d = DaemonProcess(tmp_path / "cache", moto.url, manifest=m, log_path=tmp_path / "d.log",
                      env={"NOTIFY_SOCKET": manager.path})
    d.start(wait=False)
    try:
        extend = manager.until(lambda msg: "EXTEND_TIMEOUT_USEC" in msg or msg.get("READY") == "1")
        assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 10_000_000, "no EXTEND_TIMEOUT_USEC before READY=1"
        manager.until(lambda msg: msg.get("READY") == "1")
    finally:
        assert d.stop() == 0
        manager.close()


def test_status_ready_fails_while_the_daemon_starts_or_is_absent_and_passes_once_it_serves(tmp_path, moto, s3,
                                                                                           bucket, daemons):
    """The readiness probe's command: a starting daemon is alive (``status --json`` exits 0) but must not
    be counted ready, or a DaemonSet sends traffic to a pod that cannot serve yet."""
    s3.put_object(Bucket=bucket, Key="p/0", Body=b"p0")
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/p/"])  # start-up lists p/: held at the gate
    cache = tmp_path / "cache"
    runner = CliRunner()
    r = runner.invoke(main, ["status", "--cache-dir", str(cache), "--ready"])
    assert r.exit_code == 1 and "no s3cache daemon serves" in r.stderr, r.output
    gate = Gate(moto.port)
    try:
        d = daemons(cache, manifest=m, args=["--endpoint-url", gate.url, "--read-timeout", "300"], wait=False)
        wait_for(lambda: (st := status_now(d.cache_dir)) and st["step"].startswith("reading"), 60,
                 "the control socket to answer while the manifest is read")
        r = runner.invoke(main, ["status", "--cache-dir", str(cache), "--ready"])
        assert r.exit_code == 3, r.output
        [line] = r.stderr.splitlines()
        assert line.startswith("s3cache: not ready: the daemon") and f"is starting: reading the manifest {m}" in line
        assert r.stdout == ""
        gate.open()
        d.wait_until(lambda st: st.get("state") != "starting", what="the daemon to serve")
        r = runner.invoke(main, ["status", "--cache-dir", str(cache), "--ready"])
        assert r.exit_code == 0 and r.stdout.startswith("ready: serving "), r.output
        d.stop()
    finally:
        gate.stop()
