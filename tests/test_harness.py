"""The test harness itself: children it starts die with the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from s3cache.testing import wait_for

CHILD = """
import sys, time
from s3cache.testing import DaemonProcess, MotoServer
moto = MotoServer().start()
daemon = DaemonProcess(sys.argv[1], moto.url).start()
print(moto.proc.pid, daemon.proc.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_sigkilled_test_process_leaves_no_daemon_or_moto_server_behind(tmp_path):
    # A plain Python process (no pytest, no fixtures to clean up) starts moto and a daemon, then is
    # SIGKILLed, as a test run is by a CI timeout or an impatient user.
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "cache")], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pids: list[int] = []
    try:
        line = child.stdout.readline()
        assert line, f"the child exited with {child.wait()}"
        pids = [moto_pid, daemon_pid] = list(map(int, line.split()))
        assert not gone(moto_pid) and not gone(daemon_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        wait_for(lambda: gone(daemon_pid) and gone(moto_pid), 60, "the daemon and moto to die with their parent")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)  # only if the test failed: never leave them running
