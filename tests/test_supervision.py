"""Every loop of the daemon runs under supervision: the parts' own threads too (the verifier, the signals
thread, the starting keep-alive, the peer listener). An exception escaping one is counted in status's
``loop_errors`` and logged once with its traceback, and the loop goes on; before, these four died or
logged on their own terms, and a test daemon's teardown (which looks for loop errors) never saw it."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import put_objects, write_manifest

from s3cache import resolve
from s3cache.cli import main
from s3cache.daemon.signals import Signals
from s3cache.daemon.starting import Starting
from s3cache.daemon.supervise import LoopErrors, Supervisor
from s3cache.peer.server import PeerServer
from s3cache.testing import free_port, wait_for


@pytest.mark.unclean_daemon("the verifier fails on purpose: its logged traceback is what the test looks for")
def test_a_verify_that_fails_is_answered_counted_in_loop_errors_and_the_verifier_goes_on(tmp_path, s3, bucket,
                                                                                         daemons):
    """A cached file turned into a directory (``mkdir`` by hand where a file was): hashing it raises
    IsADirectoryError, which no part expects. The client gets the error, status counts it under
    ``verify``, the log has the supervisor's line, and the next verify is served."""
    data = put_objects(s3, bucket, "v", 2, 30_000)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", list(data)))
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    uri = list(data)[0]
    path = Path(resolve(uri, cache_dir=d.cache_dir))
    path.unlink()
    path.mkdir()
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), uri])
    assert r.exit_code != 0 and "IsADirectoryError" in r.output, r.output
    d.wait_until(lambda st: st["loop_errors"].get("verify") == 1, 60, "the verifier's failure counted")
    assert "verify failed, carrying on: IsADirectoryError" in d.log()
    path.rmdir()
    path.write_bytes(data[uri])
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--all"])
    assert r.exit_code == 0 and "2 ok, 0 corrupt" in r.output, r.output
    assert d.status()["loop_errors"] == {"verify": 1}


def supervisor() -> tuple[Supervisor, list[tuple[str, str]]]:
    deaths: list[tuple[str, str]] = []
    return Supervisor(LoopErrors(), threading.Event(), lambda loop, why: deaths.append((loop, why))), deaths


def test_a_signal_call_that_raises_is_counted_and_the_next_signal_still_arrives():
    sup, deaths = supervisor()
    hups = threading.Event()

    def stop() -> None:
        raise RuntimeError("stopping failed")

    s = Signals(on_stop=stop, on_hup=hups.set, supervisor=sup).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: sup.errors.status().get("signals") == 1, 30, "the failed call counted")
        os.kill(os.getpid(), signal.SIGHUP)
        assert hups.wait(30)
    finally:
        s.close()
    assert deaths == []  # closing ends the thread, which is no death


def test_the_starting_keep_alive_and_the_peer_listener_run_supervised_and_end_without_a_death(tmp_path,
                                                                                              monkeypatch):
    """Both run on the supervisor's threads (named as before) and stop as they did, not counted as deaths."""
    sup, deaths = supervisor()
    sock = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock))
    st = Starting(str(tmp_path), None, supervisor=sup)
    peer = PeerServer(f"127.0.0.1:{free_port()}", b"s" * 32, lambda uri, wait: None)
    try:
        st.keep_alive()
        listener.settimeout(30)
        assert b"EXTEND_TIMEOUT_USEC=" in listener.recv(4096)
        peer.start(lambda target, name, stopping: sup.start(name, target, stopping=stopping))
        names = {t.name for t in threading.enumerate()}
        assert {"s3cache-starting", "s3cache-peer-server"} <= names
    finally:
        st.finish()
        peer.stop()
        listener.close()
    assert deaths == [] and sup.errors.status() == {}


def test_the_backoff_doubles_while_a_loop_keeps_failing_and_starts_over_after_a_healthy_run():
    """The order of events under an injected clock, not timing: each restart's backoff is what the
    supervisor asks the stopping event to wait. Before, it never started over: a loop that had failed
    a few times long ago waited the maximum (10 s) after every later failure."""
    from s3cache.daemon.supervise import BACKOFF, HEALTHY, supervised

    now = [0.0]
    waits: list[float] = []

    class Stopping(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return super().wait(0)

    runs = iter([0.0] * 8 + [HEALTHY, 1.0, None])  # how long each run lasts before it raises

    def body() -> None:
        lasted = next(runs)
        if lasted is None:
            stopping.set()
            return
        now[0] += lasted
        raise RuntimeError("a loop error")

    stopping = Stopping()
    deaths: list[str] = []
    supervised("loop", body, LoopErrors(), stopping, lambda n, why: deaths.append(why), clock=lambda: now[0])()
    doubling = [min(BACKOFF[0] * 2 ** i, BACKOFF[1]) for i in range(8)]
    assert waits == pytest.approx(doubling + [BACKOFF[0], BACKOFF[0] * 2]) and doubling[-1] == BACKOFF[1]
    assert deaths == []
