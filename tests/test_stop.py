"""Stopping: signals never run our code inside a handler, and SIGTERM ends the
daemon within a second or two whatever S3 does, requests still waiting for their answer included."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from conftest import put_objects, write_manifest

from s3cache.daemon.signals import Signals
from s3cache.testing import free_port, wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1 << 10


def test_signals_reach_their_calls_on_another_thread_never_inside_a_handler():
    """What a handler may do is set a flag: anything that takes a lock can deadlock on a lock the
    interrupted main thread holds. So stop and reload run on the signals thread."""
    calls: list[tuple[str, threading.Thread]] = []
    lock = threading.Lock()

    def record(what: str):
        def call() -> None:
            with lock:
                calls.append((what, threading.current_thread()))
        return call

    before = signal.getsignal(signal.SIGTERM)
    s = Signals(on_stop=record("stop"), on_hup=record("hup")).install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: any(w == "hup" for w, _ in calls), 30, "SIGHUP's call")
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: any(w == "stop" for w, _ in calls), 30, "SIGTERM's call")
        with lock:  # held by the main thread: a handler taking it would hang here
            for _ in range(20):
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0)  # let the interpreter run the pending (do-nothing) handlers under the lock
    finally:
        s.close()
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    assert {w for w, _ in calls} == {"stop", "hup"}
    assert all(t is not threading.main_thread() for _, t in calls)


def _sigterm_stops_cleanly(d) -> float:
    """SIGTERM the daemon; it must exit 0 well before any network timeout the test set (60 s or more).
    Returns the seconds the stop took."""
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(60)
    took = time.monotonic() - started
    d.proc = None
    assert rc == 0, d.log()
    assert took < 10, f"SIGTERM took {took:.1f} s"
    return took


def test_sigterm_stops_the_daemon_at_once_while_its_gets_wait_for_an_answer(tmp_path, moto, s3, bucket, daemons):
    """S3 accepts the requests and never answers (here: answers after ten minutes). The fetcher shut down
    bodies being read, not requests still waiting for headers, so a stop waited for the read timeout."""
    data = put_objects(s3, bucket, "slow", 4, 64 * KiB)
    proxy = FaultProxy(moto.port, latency=600).start()
    try:
        m = write_manifest(tmp_path / "m.txt", list(data))
        d = daemons(manifest=m, args=["--workers", "4", "--endpoint-url", proxy.url])
        wait_for(lambda: len([x for x in proxy.seen(f"/{bucket}/") if x.method == "GET"]) >= 4, 60,
                 "every worker's GET waiting for its answer")
        took = _sigterm_stops_cleanly(d)
        print(f"stopped {took:.2f} s after SIGTERM with 4 GETs waiting for headers")
        assert "Traceback" not in d.log()
    finally:
        proxy.latency = 0
        proxy.stop()



def connecting_to(port: int) -> int:
    """Sockets of this network namespace whose SYN to ``port`` is unanswered (state SYN_SENT)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                n += fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == port
    return n


def test_sigterm_stops_the_daemon_at_once_while_it_connects_to_an_endpoint_that_drops_its_syns(tmp_path,
                                                                                               daemons):
    """A black hole: the endpoint's accept queue is full, so the kernel drops every new SYN and each
    worker waits in connect() for --connect-timeout (60 s here). A stop must not wait for it."""
    port = free_port()
    hole = socket.socket()
    hole.bind(("127.0.0.1", port))
    hole.listen(0)  # never accepted: one queued connection fills it
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        m = write_manifest(tmp_path / "m.txt", [f"s3://bkt/k{i}" for i in range(4)])
        d = daemons(manifest=m, args=["--workers", "4", "--connect-timeout", "60",
                                      "--endpoint-url", f"http://127.0.0.1:{port}"])
        wait_for(lambda: connecting_to(port) >= 4, 60, "the daemon's four connections in SYN_SENT")
        took = _sigterm_stops_cleanly(d)
        print(f"stopped {took:.2f} s after SIGTERM with 4 connections in SYN_SENT")
        assert "unreachable" not in d.log()  # a hang-up of our own while stopping is not an outage
    finally:
        for c in fillers:
            c.close()
        hole.close()


def test_sigterm_while_sighup_reads_a_new_manifest_stops_the_daemon(tmp_path, s3, bucket, daemons):
    """SIGHUP reads the manifest into a new watch on the reload thread while SIGTERM stops the daemon on
    the signals thread. A stop that came during that read used to stop the old watch only: the new one
    was swapped in afterwards and its thread started, and teardown waited for it until the daemon was
    killed (a full run and 6 of 15 runs of a test under a CPU hog saw it)."""
    uris = list(put_objects(s3, bucket, "m", 2, KiB))
    m = write_manifest(tmp_path / "m.txt", uris)
    # A long settle: SIGHUP's read of a manifest written in place waits this long, so the stop below
    # certainly comes during it.
    d = daemons(manifest=m, args=["--manifest-settle", "3"])
    d.wait_until(lambda st: st["objects"]["ready"] == 2, what="both objects")
    with open(m, "a") as f:  # written in place: a read waits for it to hold still
        f.write("# edited\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloading the configuration" in d.log(), 30, "SIGHUP's reload to start")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0
    assert "stopped" in d.log() and "did not stop within" not in d.log()
