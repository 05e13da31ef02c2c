"""A daemon that is starting says so (issue 26.1): its control socket opens as soon as it holds the cache
dir, and until it serves, ``status`` (text, --json) and the metrics name the step, a reader's resolve
waits (up to its own timeout) instead of raising DaemonNotRunning, and systemd is sent
EXTEND_TIMEOUT_USEC so a slow start is not killed.

The start is held in its first step by a manifest that keeps being written (start-up waits for it to hold
still), released when the test stops touching it."""

from __future__ import annotations

import os
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


class Toucher:
    """Keeps ``path`` modified (as a writer still writing it would) until ``stop``."""

    def __init__(self, path: Path) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,))
        self._thread.start()

    def _run(self, path: Path) -> None:
        while not self._stop.wait(0.1):
            os.utime(path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


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


def test_a_starting_daemon_says_so_and_a_reader_waits_for_it(tmp_path, s3, bucket, daemons):
    body = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    uri = f"s3://{bucket}/k"
    m = write_manifest(tmp_path / "m.txt", [uri])
    toucher = Toucher(m)
    port = free_port()
    try:
        d = daemons(manifest=m, args=["--manifest-settle", "1", "--metrics-addr", f"127.0.0.1:{port}"], wait=False)
        st = wait_for(lambda: (st := status_now(d.cache_dir)) and st["step"].startswith("reading") and st, 30,
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
        wait_for(lambda: status_now(d.cache_dir)["waiting"] == 1, 30, "the reader to ask and wait")
        toucher.stop()  # the manifest holds still: start-up goes on
        reader.join(90)
        assert got and got[0] == body, got
        st = d.wait_until(lambda st: st.get("state") != "starting", what="the daemon to serve")
        assert st["objects"]["ready"] == 1 and starting_gauge(port) == 0
    finally:
        toucher.stop()


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
