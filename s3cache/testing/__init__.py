"""Real parts for the demo, the tests and the benchmarks: moto's S3 server and the daemon, each as a
subprocess, started and waited on by condition (never by a fixed sleep) and always cleaned up.

Nothing here is imported by the daemon or by ``resolve``; moto is needed only when a MotoServer starts.

Every child is started with ``PR_SET_PDEATHSIG`` (SIGKILL): when the process that started it dies,
however it dies (a SIGKILLed pytest included), the kernel kills the child too, so no daemon or moto
server is left behind holding a port, a cache dir's lock or CPU.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

# moto accepts any credentials; these keep boto3 from looking for real ones.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``cond`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when this process (strictly: the thread that
    starts it, so start children from a thread that outlives them) dies. Linux only."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class MotoServer:
    """moto's S3 server on a free 127.0.0.1 port, as a subprocess."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self._env = env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        env = {**os.environ, **FAKE_CREDENTIALS, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(128 << 20), **self._env}
        out = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent())
        if out is not subprocess.DEVNULL:
            out.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2).close()
                return True
            except OSError:
                return False

        wait_for(up, 60, "moto's S3 server to answer")
        return self

    def client(self, service: str = "s3", key: str = "testing", secret: str = "testing", **config):
        import boto3
        import botocore.config

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            config=botocore.config.Config(**config) if config else None)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DaemonProcess:
    """``s3cache serve`` as a subprocess, ready when its control socket answers."""

    def __init__(self, cache_dir: str | os.PathLike, endpoint_url: str, *, manifest: str | os.PathLike | None = None,
                 args: list[str] | None = None, log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.cmd = [sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(cache_dir),
                    "--endpoint-url", endpoint_url]
        if manifest is not None:
            self.cmd += ["--manifest", str(manifest)]
        self.cmd += args or []
        self.log_path = Path(log_path) if log_path else self.cache_dir.parent / f"{self.cache_dir.name}.daemon.log"
        self.env = {**os.environ, **FAKE_CREDENTIALS, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> DaemonProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, preexec_fn=die_with_parent())
        if wait:
            wait_for(self._ready, 60, f"the daemon on {self.cache_dir} (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        from s3cache.sockets.control import Client
        from s3cache.store.files import Layout

        from ..errors import DaemonNotRunning

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with Client(Layout(str(self.cache_dir.absolute())).control_socket, str(self.cache_dir), timeout=5) as c:
                return bool(c.request({"op": "hello"}).get("ok"))
        except (DaemonNotRunning, OSError):
            return False

    def status(self) -> dict:
        from s3cache.sockets.control import Client
        from s3cache.store.files import Layout

        with Client(Layout(str(self.cache_dir.absolute())).control_socket, str(self.cache_dir)) as c:
            return c.request({"op": "status"})["status"]

    def wait_until(self, cond: Callable[[dict], object], timeout: float = 120, what: str = "a daemon state") -> dict:
        """Poll status until ``cond(status)`` holds; returns that status."""
        def check():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            st = self.status()
            return st if cond(st) else None

        return wait_for(check, timeout, what, interval=0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = _stop(self.proc)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
