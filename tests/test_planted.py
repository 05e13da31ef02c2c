"""Tests with teeth: each one fails when a specific bug is planted in the daemon, and passes on the real
code. What each guards against is in its docstring; each was run against its plant and seen to fail.

The publish-order tests watch the real daemon's system calls with strace (attached to the running
daemon, so nothing of ours is replaced): a rename, a directory fsync and an index commit are facts the
kernel sees, whatever the code around them says it does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import write_manifest
from prometheus_client.parser import text_string_to_metric_families

from s3cache import resolve
from s3cache.errors import DaemonNotRunning
from s3cache.store.index import PUBLISHING, READY, Index
from s3cache.store.layout import Layout
from s3cache.testing import free_port, wait_for
from s3cache.testing.faultproxy import FaultProxy


@pytest.fixture
def proxy(moto):
    p = FaultProxy(moto.port).start()
    yield p
    p.stop()


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples as {name: value}."""
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


# == 1. s3cache_s3_retries_total counts retries, not requests ==========================================

def test_retries_metric_counts_retries_not_requests(tmp_path, s3, bucket, proxy, daemons):
    """The first GET of each object is answered 500, so each object costs exactly one retry: the metric
    must equal status' ``retries`` (and the faults injected), not ``requests`` (which the proxy counts)."""
    keys = [f"k{i}" for i in range(3)]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=os.urandom(2000))
    failed_once: set[str] = set()

    def plan(method: str, path: str, query: str) -> str | None:
        if method == "GET" and path.startswith(f"/{bucket}/k") and path not in failed_once:
            failed_once.add(path)
            return "500"
        return None

    proxy.plan = plan
    port = free_port()
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{k}" for k in keys])
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--metrics-addr", f"127.0.0.1:{port}"])
    before = d.wait_until(lambda st: st["objects"]["ready"] == len(keys), what="every object fetched through the 500s")
    metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    st = d.status()  # housekeeping may still ask S3 something between the two: the scrape lies between them
    assert proxy.faults["500"] == len(keys)
    assert st["retries"] == len(keys), st
    # Requests are the retried GETs plus their successful repeats (and HEADs, if any): more than retries.
    assert st["requests"] > st["retries"]
    assert st["requests"] <= proxy.total(), (st["requests"], proxy.total())
    assert before["requests"] <= metrics["s3cache_s3_requests_total"] <= st["requests"]
    assert metrics["s3cache_s3_retries_total"] == st["retries"], (
        f"s3cache_s3_retries_total={metrics['s3cache_s3_retries_total']}, status retries={st['retries']}, "
        f"requests={st['requests']}, proxy saw {proxy.total()} requests")


# == 2. failed_permanent and failed_retrying each count their own kind ===================================

def test_permanent_and_retrying_failures_land_in_their_own_fields(tmp_path, s3, bucket, proxy, daemons):
    """Two missing keys (NoSuchKey: permanent) and one key the proxy answers 500 every time (transient,
    retried later): 2 and 1, so a swap of the two fields cannot pass unseen."""
    s3.put_object(Bucket=bucket, Key="flaky", Body=b"x" * 100)
    proxy.plan = lambda m, p, q: "500" if p == f"/{bucket}/flaky" else None
    uris = [f"s3://{bucket}/gone1", f"s3://{bucket}/gone2", f"s3://{bucket}/flaky"]
    m = write_manifest(tmp_path / "m.txt", uris)
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--max-attempts", "2"])
    st = d.wait_until(lambda st: st["objects"]["failed"] == 3, timeout=120, what="all three objects failed")
    by_uri = {f["uri"]: f for f in st["failures"]}
    assert by_uri[uris[0]]["permanent"] and by_uri[uris[1]]["permanent"], st["failures"]
    assert not by_uri[uris[2]]["permanent"] and by_uri[uris[2]]["retry_in"] is not None, st["failures"]
    assert (st["failed_permanent"], st["failed_retrying"]) == (2, 1), (
        f"failed_permanent={st['failed_permanent']} failed_retrying={st['failed_retrying']}; "
        f"failures: {st['failures']}")


# == 3 and 4. the publish order, seen by the kernel =====================================================

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    return path


class Strace:
    """strace attached to every thread of a running process (and the threads it starts after), writing
    to ``out``; ``extra`` adds options (an ``inject=``)."""

    def __init__(self, pid: int, out: Path, syscalls: str, extra: tuple[str, ...] = ()) -> None:
        self.out = out
        self.pid = pid
        self.err = out.with_suffix(".err")
        tasks = os.listdir(f"/proc/{pid}/task")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([_strace(), "-f", "-y", "-q", "-e", f"trace={syscalls}",
                                          *extra, "-o", str(out), "-p", str(pid)],
                                         stdout=subprocess.DEVNULL, stderr=err)
        # Wait until the kernel names strace as the tracer of every thread the daemon had: only then is
        # no call of theirs missed (threads started later are followed by -f from their first call).
        try:
            wait_for(lambda: self._attached(tasks), 30, "strace attached to the daemon's threads")
        except BaseException:
            self.stop()
            raise

    def _attached(self, tasks: list[str]) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"strace exited {self.proc.returncode}: {self.err.read_text()}")
        for t in tasks:
            try:
                if _tracer(self.pid, int(t)) != self.proc.pid:
                    return False
            except FileNotFoundError:
                continue  # the thread ended meanwhile: none of its calls can be missed
        return True

    def stop(self) -> list[tuple[int, str, str]]:
        """Detach; every traced call as (thread id, syscall, arguments and result)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detaches and leaves the tracee running
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        calls = []
        for line in self.out.read_text().splitlines():
            mo = _LINE.match(line)
            if mo:
                calls.append((int(mo.group(1)), mo.group(2), mo.group(3)))
        return calls


def _tracer(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def _is_rename(name: str) -> bool:
    return name in ("rename", "renameat", "renameat2")


def test_publish_fsyncs_the_directory_after_the_rename_and_before_ready(tmp_path, s3, bucket, daemons):
    """In the thread that publishes: the index commits (the 'publishing' intent), the temp file is
    renamed into place, the file's directory is fsync'd, and only then does the index commit again (the
    'ready' row). Skipping the directory fsync, or committing 'ready' before it, fails this test."""
    body = os.urandom(5000)
    s3.put_object(Bucket=bucket, Key="dir/k", Body=body)
    d = daemons()
    layout = Layout(str(d.cache_dir.absolute()))
    index_dir = os.path.realpath(layout.index)
    trace = Strace(d.proc.pid, tmp_path / "strace.txt", "fsync,fdatasync,rename,renameat,renameat2")
    try:
        path = resolve(f"s3://{bucket}/dir/k", cache_dir=d.cache_dir, timeout=120)
        assert Path(path).read_bytes() == body
        # 'ready' rows are written with the next batch's intents, or alone shortly after: wait for it
        d.wait_until(lambda st: st["fetched"] == 1 and st["ready_rows_pending"] == 0, what="the 'ready' row written")
    finally:
        calls = trace.stop()
    file_dir = os.path.dirname(os.path.realpath(path))
    renames = [i for i, (_, name, args) in enumerate(calls)
               if _is_rename(name) and f'"{os.path.basename(path)}"' in args and f"<{file_dir}>" in args]
    assert len(renames) == 1, f"one rename of the file into {file_dir}: {calls}"
    tmp_name = re.search(r'tmp>, "([^"]+)"', calls[renames[0]][2]).group(1)
    assert any(name in ("fsync", "fdatasync") and f"/{tmp_name}>" in args for _, name, args in calls[:renames[0]]), (
        f"the temp file {tmp_name} fsync'd before its rename: {calls}")
    tid = calls[renames[0]][0]
    mine = [(name, args) for t, name, args in calls if t == tid]  # the publisher's calls, in order
    at = next(i for i, (name, args) in enumerate(mine) if _is_rename(name) and f"<{file_dir}>" in args)

    def index_sync(call: tuple[str, str]) -> bool:
        return call[0] in ("fsync", "fdatasync") and f"<{index_dir}/" in call[1]

    def dir_sync(call: tuple[str, str]) -> bool:
        return call[0] == "fsync" and re.match(rf"\d+<{re.escape(file_dir)}>", call[1]) is not None

    before, after = mine[:at], mine[at + 1:]
    assert any(index_sync(c) for c in before), f"the 'publishing' intent committed before the rename: {mine}"
    ready = next((i for i, c in enumerate(after) if index_sync(c)), None)
    assert ready is not None, f"no index commit after the rename (the 'ready' row): {mine}"
    synced = [i for i, c in enumerate(after) if dir_sync(c)]
    assert synced and synced[0] < ready, (
        f"the directory {file_dir} must be fsync'd after the rename and before the 'ready' commit; "
        f"the publishing thread's calls from the rename on: {mine[at:]}")


@pytest.mark.unclean_daemon("the test kills the daemon at its first rename, between the index row and it")
def test_a_kill_between_the_row_and_the_rename_leaves_no_ready_row_without_its_file(tmp_path, s3, bucket,
                                                                                   daemons):
    """The daemon is killed (SIGKILL, by strace, on entering the rename syscall: the rename never runs)
    just after the index row of a publish is committed. The row on disk must say 'publishing', not
    'ready' (a 'ready' row for a file that is not there is what a row written before the rename leaves);
    a restarted daemon settles it and serves the right bytes."""
    body = os.urandom(7000)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    uri = f"s3://{bucket}/k"
    cache = tmp_path / "cache"
    d = daemons(cache)
    pid = d.proc.pid
    trace = Strace(pid, tmp_path / "strace.txt", "rename,renameat,renameat2",
                   ("-e", "inject=rename,renameat,renameat2:error=EIO:signal=SIGKILL:when=1"))
    try:
        with pytest.raises(DaemonNotRunning):
            resolve(uri, cache_dir=cache, timeout=60)  # the daemon dies under this reader
        wait_for(lambda: d.proc.poll() is not None, 60, "the daemon killed at its rename")
    finally:
        calls = trace.stop()
    assert d.proc.returncode == -signal.SIGKILL, d.proc.returncode
    assert len(calls) == 1 and "/.s3cache/tmp>" in calls[0][2], f"killed at the publish's rename: {calls}"
    layout = Layout(str(cache.absolute()))
    idx = Index(layout.index)
    try:
        rows = dict(idx.items())
    finally:
        idx.close()
    assert uri in rows, f"the row was committed before the rename: {rows}"
    rec = rows[uri]
    assert not os.path.exists(layout.abspath(rec.path)), "the rename never ran: the file is not in place"
    assert rec.state == PUBLISHING, f"a {rec.state!r} row for {rec.path}, a file not in place"
    for u, r in rows.items():  # no reader may ever find a 'ready' row without its file
        assert r.state != READY or os.path.exists(layout.abspath(r.path)), (u, r)

    d2 = daemons(cache)
    assert Path(resolve(uri, cache_dir=cache, timeout=120)).read_bytes() == body
    d2.wait_until(lambda st: st["objects"]["ready"] == 1, what="the object ready after the restart")
