"""Shared fixtures: one real moto S3 server per session, a daemon factory that always cleans up, and a
check that no test leaks threads (the watchdog test suite's habit, worth copying)."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from s3cache.testing import FAKE_CREDENTIALS, DaemonProcess, MotoServer

for k, v in FAKE_CREDENTIALS.items():
    os.environ.setdefault(k, v)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    server = MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto):
    # Upload without the default CRC32 so objects look like data written by older tools: then the
    # ETag (or the manifest) is the only checksum, which is the common case in the field.
    return moto.client(request_checksum_calculation="when_required")


@pytest.fixture
def bucket(s3):
    name = "t-" + uuid.uuid4().hex[:16]
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def daemons(tmp_path, moto):
    """Start daemons with ``daemons(cache_dir, manifest=..., args=[...])``; all are stopped at the end."""
    started: list[DaemonProcess] = []

    def start(cache_dir: Path | None = None, *, manifest=None, args=None, wait=True, env=None) -> DaemonProcess:
        d = DaemonProcess(cache_dir or tmp_path / "cache", moto.url, manifest=manifest,
                          args=list(args or []), env=env,
                          log_path=tmp_path / f"daemon-{len(started)}.log")
        started.append(d)
        return d.start(wait=wait)

    yield start
    for d in started:
        d.stop()


@pytest.fixture(autouse=True)
def no_thread_leaks():
    before = set(threading.enumerate())
    yield
    leaked = []
    for t in set(threading.enumerate()) - before:
        if isinstance(t, threading._DummyThread) or type(t).__name__ == "InotifyFD":
            continue  # TensorFlow's native threads; watchdog's one process-wide inotify reader
        t.join(timeout=10)
        if t.is_alive():
            leaked.append(f"{t.name} ({type(t).__module__}.{type(t).__qualname__})")
    assert not leaked, f"threads left running: {leaked}"


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path
