"""A training process may hold more than a thousand open files (shards, sockets, TensorFlow's own):
a reader that waits on the daemon must not depend on its socket's number being below select()'s 1024."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1 << 10

_READER = """
import os, sys
from s3cache import resolve
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the socket to the daemon comes after these
path = resolve(sys.argv[1], cache_dir=sys.argv[2], timeout=90)
print(open(path, "rb").read().decode())
"""


def _blocked_in_poll(pid: int) -> bool:
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "poll" in wchan or "select" in wchan


def test_a_reader_with_more_than_1024_open_files_waits_for_its_file(s3, bucket, moto, daemons):
    s3.put_object(Bucket=bucket, Key="late", Body=b"landed" * KiB)
    gate, asked = threading.Event(), threading.Event()

    def plan(method, path, query):
        if path.endswith("/late") and not gate.is_set():
            asked.set()
            gate.wait(60)  # hold the daemon's GET: the reader has to wait for the file

    proxy = FaultProxy(moto.port, plan).start()
    try:
        d = daemons(args=["--endpoint-url", proxy.url])
        reader = subprocess.Popen([sys.executable, "-c", _READER, f"s3://{bucket}/late", str(d.cache_dir)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert asked.wait(60)  # the reader asked
            # and waits on its socket (or has already failed trying to)
            wait_for(lambda: reader.poll() is not None or _blocked_in_poll(reader.pid), 60,
                     "the reader to wait on its socket")
            gate.set()
            out, err = reader.communicate(timeout=120)
        finally:
            gate.set()
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert reader.returncode == 0, err
        assert out.strip() == "landed" * KiB
        assert d.stop() == 0
    finally:
        proxy.stop()
