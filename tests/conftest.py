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


# What a daemon's log must never show in a test that does not mean it: a traceback, a loop that survived
# an exception (supervise.LoopErrors), a thread that died.
UNCLEAN = ("Traceback (most recent call last)", "failed, carrying on:", "failed again", "thread died",
           "did not stop within")


class CheckedDaemon(DaemonProcess):
    """A test daemon that remembers how it exited, whoever stopped it."""

    exit_code: int | None = None

    def stop(self) -> int | None:
        rc = super().stop()
        if rc is not None:
            self.exit_code = rc
        return rc


def pytest_configure(config):
    config.addinivalue_line("markers", "unclean_daemon(reason): this test's daemons may exit non-zero or log "
                                       "errors on purpose (a kill -9, a failure it provokes); say why")


@pytest.fixture
def daemons(tmp_path, moto, request, small_fs):
    """Start daemons with ``daemons(cache_dir, manifest=..., args=[...])``; all are stopped at the end, and
    each must then have exited 0 with no traceback, loop error or dead thread in its log, unless the test
    is marked ``unclean_daemon(reason)``. (It asks for ``small_fs`` so that its daemons stop before any
    filesystem a test mounted for them is unmounted: fixtures end in the reverse order they began.)"""
    started: list[CheckedDaemon] = []

    def start(cache_dir: Path | None = None, *, manifest=None, args=None, wait=True, env=None) -> DaemonProcess:
        # These daemons serve tests of everything but the demand scope, which fetch on demand from
        # throwaway buckets: they may fetch any object (S3CACHE_ALLOW=s3://). The scope's own tests
        # (test_scope.py) give --allow, which beats the environment, or set S3CACHE_ALLOW themselves.
        d = CheckedDaemon(cache_dir or tmp_path / "cache", moto.url, manifest=manifest,
                          args=list(args or []), env={"S3CACHE_ALLOW": "s3://", **(env or {})},
                          log_path=tmp_path / f"daemon-{len(started)}.log")
        started.append(d)
        return d.start(wait=wait)

    yield start
    problems = []
    for i, d in enumerate(started):
        d.stop()
        if d.exit_code not in (0, None):  # None: the test ended it itself (a kill, its own wait)
            problems.append(f"daemon {i} exited {d.exit_code}")
        bad = [line for line in d.log().splitlines() if any(u in line for u in UNCLEAN)]
        if bad:
            problems.append(f"daemon {i}'s log ({d.log_path}): " + " | ".join(bad[:5]))
    if problems and request.node.get_closest_marker("unclean_daemon") is None:
        pytest.fail("test daemons did not stop cleanly: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def fresh_readers():
    """Each test's readers start afresh: the process-wide reader state (a lease-lock descriptor and a
    usage connection per cache dir) is closed after every test instead of piling up for the run."""
    yield
    import importlib

    importlib.import_module("s3cache.reader.resolve").reset()  # the module: the package's `resolve` is the function


@pytest.fixture
def store(tmp_path):
    """An open Store on a fresh cache dir (the fetcher tests' temp files go there)."""
    from s3cache.store.files import Store

    s = Store(str(tmp_path / "cache"))
    s.open()
    yield s
    s.close()


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


@pytest.fixture
def proxy(moto):
    """A fault proxy in front of moto that counts requests (tests that need a stalling one define their
    own ``proxy``, which takes precedence)."""
    from s3cache.testing.faultproxy import FaultProxy

    p = FaultProxy(moto.port).start()
    yield p
    p.stop()


@pytest.fixture
def aws_proxy(moto):
    """A fault proxy in front of moto that answers ranged GETs as AWS does: with no checksum headers
    (moto sends them when a range covers the whole object). The integrity tests' proxy."""
    from s3cache.testing.faultproxy import FaultProxy

    p = FaultProxy(moto.port, ranged_checksums=False).start()
    yield p
    p.stop()


@pytest.fixture
def fetch_attempts() -> int:
    """``fetcher``'s default ``max_attempts``; a test module overrides this fixture to change it."""
    return 5


@pytest.fixture
def fetcher(aws_proxy, store, fetch_attempts):
    """``fetcher(part_size=MiB, max_attempts=fetch_attempts, **Fetcher kwargs) -> Fetcher`` through
    ``aws_proxy`` into ``store``'s temp files, four workers; each is closed at the end of the test."""
    import threading

    from s3cache.fetch.fetcher import Fetcher, make_client

    made = []

    def make(part_size=1 << 20, max_attempts=None, **kw):
        f = Fetcher(make_client(aws_proxy.url, "us-east-1", 16, 5, 10), part_size=part_size, workers=4,
                    max_attempts=fetch_attempts if max_attempts is None else max_attempts,
                    cancel=threading.Event(), new_temp=store.new_temp, discard=store.discard, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def put_objects(s3, bucket: str, prefix: str, n: int, size: int, width: int = 2) -> dict[str, bytes]:
    """Upload ``n`` objects of ``size`` random bytes as ``prefix/NN``; their URIs and bytes, in order."""
    data = {}
    for i in range(n):
        body = os.urandom(size)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{i:0{width}d}", Body=body)
        data[f"s3://{bucket}/{prefix}/{i:0{width}d}"] = body
    return data


def gets_per_epoch(proxy, bucket: str, data: dict[str, bytes], cache_dir, epochs: int = 3) -> list[int]:
    """Read ``data``'s objects in order through the cache ``epochs`` times, checking every byte; the GETs
    the proxy saw in each epoch."""
    from s3cache import iter_resolve

    uris, gets = list(data), []
    for _ in range(epochs):
        before = proxy.gets(f"/{bucket}/")
        for uri, p in zip(uris, iter_resolve(uris, cache_dir=cache_dir, timeout=120)):
            assert Path(p).read_bytes() == data[uri]
        gets.append(proxy.gets(f"/{bucket}/") - before)
    return gets


# == shared fixtures for the trust work: a CPU hog, a small filesystem, a second local user ==========
#
# Tests that need them ask for them; the `--cpu-hog` option puts the whole run under a hog on every core
# (the stress mode: `python -m pytest --cpu-hog`), so races that need a loaded machine show up on demand.

import multiprocessing
import shutil
import subprocess


def pytest_addoption(parser):
    parser.addoption("--cpu-hog", action="store_true", default=False,
                     help="run every test with a busy process on each core (the stress mode)")


def _spin() -> None:
    while True:
        pass


class CpuHog:
    """One busy process per core (or ``n``), killed by ``stop``. Idempotent; safe to nest."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n or os.cpu_count() or 2
        self.procs: list[multiprocessing.Process] = []

    def start(self) -> "CpuHog":
        ctx = multiprocessing.get_context("fork")
        for _ in range(self.n):
            p = ctx.Process(target=_spin, daemon=True)
            p.start()
            self.procs.append(p)
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(10)
        self.procs.clear()


@pytest.fixture(scope="session", autouse=True)
def _session_cpu_hog(request):
    if not request.config.getoption("--cpu-hog"):
        yield None
        return
    hog = CpuHog().start()
    yield hog
    hog.stop()


@pytest.fixture
def cpu_hog():
    """A busy process on each core for the duration of the test."""
    hog = CpuHog().start()
    yield hog
    hog.stop()


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(size) -> Path``: a tmpfs of ``size`` (e.g. "12m") mounted for this test and unmounted
    after it. Skips where mounting is not allowed (not root, no tmpfs)."""
    mounts: list[Path] = []

    def make(size: str = "8m", name: str = "smallfs") -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        where = tmp_path / f"{name}-{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounts.append(where)
        return where

    yield make
    for m in reversed(mounts):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


class LocalUser:
    """A throwaway local user (and optionally a member of a group), removed at the end of the test."""

    def __init__(self, name: str, uid: int, gid: int, groups: list[str]) -> None:
        self.name, self.uid, self.gid, self.groups = name, uid, gid, groups

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` as this user (via setpriv, keeping the environment)."""
        import grp
        gids = [grp.getgrnam(g).gr_gid for g in self.groups]
        pre = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
               "--groups=" + (",".join(map(str, gids)) if gids else ""), "--"] if gids else \
              ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
        return subprocess.run(pre + argv, capture_output=True, text=True, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        import grp
        gids = [grp.getgrnam(g).gr_gid for g in self.groups]
        pre = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}"]
        pre += [f"--groups={','.join(map(str, gids))}"] if gids else ["--clear-groups"]
        return subprocess.Popen(pre + ["--"] + argv, **kw)


@pytest.fixture
def local_user():
    """``local_user(groups=[...]) -> LocalUser``: a fresh unprivileged user, deleted after the test
    (with any group this fixture created). Skips where users cannot be made (not root, no useradd)."""
    import grp
    import pwd
    made_users: list[str] = []
    made_groups: list[str] = []

    def make(groups: tuple[str, ...] = ()) -> LocalUser:
        if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
            pytest.skip("creating a local user needs root, useradd and setpriv")
        for g in groups:
            try:
                grp.getgrnam(g)
            except KeyError:
                subprocess.run(["groupadd", g], check=True, capture_output=True)
                made_groups.append(g)
        name = "s3ct" + uuid.uuid4().hex[:8]
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-U", name]
                       + (["-G", ",".join(groups)] if groups else []), check=True, capture_output=True)
        made_users.append(name)
        pw = pwd.getpwnam(name)
        return LocalUser(name, pw.pw_uid, pw.pw_gid, list(groups))

    yield make
    for u in made_users:
        subprocess.run(["userdel", u], capture_output=True)
    for g in made_groups:
        subprocess.run(["groupdel", g], capture_output=True)
