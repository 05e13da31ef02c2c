"""Stopping (issue 26, item 12): signals never run our code inside a handler, and SIGTERM ends the
daemon within a second or two whatever S3 does, requests still waiting for their answer included."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import put_objects, write_manifest
from s3cache.daemon.signals import Signals
from s3cache.testing import wait_for
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
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(60)
        took = time.monotonic() - started
        d.proc = None
        assert rc == 0, d.log()
        assert took < 10, f"SIGTERM took {took:.1f} s"
        print(f"stopped {took:.2f} s after SIGTERM with 4 GETs waiting for headers")
        assert "Traceback" not in d.log()
    finally:
        proxy.latency = 0
        proxy.stop()

