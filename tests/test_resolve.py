"""The reader side against the real daemon: the lease lock shared by a process's threads, a bounded wait
for that lock, asking again for a file that vanished after "ready", and process-wide state that can be
closed."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from s3cache import resolve
from s3cache.store.files import Layout
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1 << 10


def lease_lock(cache_dir) -> str:
    return os.path.join(Layout(str(Path(cache_dir).absolute())).private, "lease.lock")


def exclusive_is_free(path: str) -> bool:
    """Could another process take the lease lock exclusively right now (as eviction does)?"""
    return subprocess.run(["flock", "-x", "-n", path, "true"]).returncode == 0


def test_one_threads_unlock_does_not_drop_anothers_shared_lease(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    d = daemons()
    resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120)
    r = sys.modules["s3cache.reader.resolve"].resolver_for(d.cache_dir)
    path = lease_lock(d.cache_dir)
    a_in, a_out, b_in, b_out = (threading.Event() for _ in range(4))

    def holder(entered: threading.Event, leave: threading.Event) -> None:
        with r._shared_lease():
            entered.set()
            leave.wait(60)

    ta = threading.Thread(target=holder, args=(a_in, a_out))
    tb = threading.Thread(target=holder, args=(b_in, b_out))
    ta.start()
    try:
        a_in.wait(60)
        tb.start()
        b_in.wait(60)
        assert not exclusive_is_free(path)
        a_out.set()
        ta.join(60)
        # Thread B is still between "found the file" and "told the daemon": eviction must be locked out.
        assert not exclusive_is_free(path)
    finally:
        a_out.set()
        b_out.set()
        ta.join(60)
        if tb.is_alive() or b_in.is_set():
            tb.join(60)
    assert exclusive_is_free(path)


def test_many_threads_of_one_process_never_lose_a_leased_file_while_eviction_runs(tmp_path, s3, bucket, daemons):
    n, size, lease = 48, 32 * KiB, 2.0
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"s/{i:03d}", Body=i.to_bytes(4, "big") + os.urandom(size - 4))
    d = daemons(args=["--max-size", str(16 * size), "--lease", str(lease), "--workers", "8"])
    errors: list[str] = []
    reopened = [0]

    def reader(seed: int) -> None:  # as tf.data's parallel interleave calls resolve: from many threads
        rng = random.Random(seed)
        prev = None
        step = "resolve"
        start = time.monotonic()
        seen: list[str] = []  # this thread's keys, with when it resolved each: what its lease should hold
        try:
            for _ in range(10):
                i = rng.randrange(n)
                seen.append(f"{i}@{time.monotonic() - start:.2f}")
                step = "resolve"
                path = resolve(f"s3://{bucket}/s/{i:03d}", cache_dir=d.cache_dir, timeout=120)
                got = time.monotonic()
                step = "open right after resolve"
                with open(path, "rb") as f:
                    if f.read(4) != i.to_bytes(4, "big"):
                        errors.append(f"wrong bytes in {path}")
                age = None if prev is None else time.monotonic() - prev[1]
                if prev is not None and age < lease * 0.5:
                    step = f"re-open {age:.3f}s after its resolve"
                    open(prev[0], "rb").close()
                    reopened[0] += 1
                prev = (path, got)
        except Exception as e:
            errors.append(f"thread {seed}, {step}: {type(e).__name__}: {e} (its keys, at s: {seen})")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    st = d.status()
    assert st["evicted"] > 0  # eviction did run while the threads read
    print(f"16 threads, 160 resolves, {reopened[0]} re-opens within the lease, {st['evicted']} evictions")


def test_a_file_a_thread_resolves_again_is_leased_from_its_second_resolve(tmp_path, s3, bucket, daemons):
    """Thread A resolves x, and again once its first lease ran out, while thread B of the same process
    keeps resolving p and q (so x is not among the process's two newest files). A third thread's want
    for z then needs room in a cache of three files: x, resolved again moments ago, must stay, and z
    waits for x's lease to end. The daemon renewed nothing on the second resolve before the fix (a
    thread's hold kept the time of its first note) and evicted x at once."""
    size, lease = 4 * KiB, 2.0
    for key in ("x", "p", "q", "z"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode() * size)
    d = daemons(args=["--max-size", str(3 * size), "--lease", str(lease)])
    uri = {key: f"s3://{bucket}/{key}" for key in ("x", "p", "q", "z")}
    x = resolve(uri["x"], cache_dir=d.cache_dir, timeout=120)
    stop, done = threading.Event(), [0]
    failures: list[BaseException] = []

    def keep_reading() -> None:  # thread B: the process's other reads
        try:
            while not stop.is_set():
                for key in ("p", "q"):
                    resolve(uri[key], cache_dir=d.cache_dir, timeout=120)
                    done[0] += 1
                stop.wait(0.02)
        except Exception as e:  # reported by the main thread
            failures.append(e)

    b = threading.Thread(target=keep_reading)
    b.start()
    got: list = []
    c = threading.Thread(target=lambda: got.append(_resolve_or_error(uri["z"], d.cache_dir)))
    try:
        # x's first lease has ended (only p and q are held) while the process kept reading
        d.wait_until(lambda st: st["objects"]["ready"] == 3 and st["leases"]["files"] == 2, 60,
                     "x's first lease to end")
        assert not failures, failures
        x_again = resolve(uri["x"], cache_dir=d.cache_dir, timeout=120)  # thread A resolves x again
        t1 = time.monotonic()
        assert x_again == x
        after = done[0]
        wait_for(lambda: done[0] >= after + 2 or failures, 60, "thread B's next resolves of p and q")
        stop.set()
        b.join(60)
        assert not failures, failures
        c.start()  # z needs room: the cache holds x, p and q
        d.wait_until(lambda st: st["evicted"] or any(w["uri"] == uri["z"] for w in st["waiting_for_space"]),
                     60, "z's admission")
        assert time.monotonic() - t1 < lease, "too slow to judge: x's second lease ended before the look"
        with open(x, "rb") as f:  # within x's lease from its second resolve, it must be there
            assert f.read(1) == b"x"
    finally:
        stop.set()
        b.join(60)
        if c.ident is not None:  # started
            c.join(120)
    assert got and isinstance(got[0], str), got  # z came once x's lease ended (and evicted x, or more
    assert not os.path.exists(x)  # down to the low watermark: p and q's leases may have ended too)


def test_a_wait_for_the_lease_lock_is_bounded_by_the_timeout(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    d = daemons()
    resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120)
    # Another process holds the lease lock exclusively and never lets go (a hostile `flock -x`).
    holder = subprocess.Popen(["flock", "-x", lease_lock(d.cache_dir), "sleep", "600"])
    try:
        wait_for(lambda: not exclusive_is_free(lease_lock(d.cache_dir)), 30, "the hostile lock holder")
        code = ("import sys; from s3cache import resolve; from s3cache.errors import ResolveTimeout\n"
                "try:\n"
                f"    resolve('s3://{bucket}/k', cache_dir={str(d.cache_dir)!r}, timeout=2)\n"
                "except ResolveTimeout as e:\n"
                "    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "lease lock" in r.stdout and "lease.lock" in r.stdout
    finally:
        holder.kill()
        holder.wait()


def test_a_file_gone_after_its_ready_answer_is_asked_for_again(tmp_path, s3, bucket, moto, daemons):
    """The file is published, the daemon pushes "ready", and the file is gone before the reader looks
    (evicted, here removed): the reader must ask again rather than wait for its timeout."""
    import fcntl

    s3.put_object(Bucket=bucket, Key="vanishing", Body=b"v" * KiB)
    gate = threading.Event()
    asked = threading.Event()

    def plan(method, path, query):
        if path.endswith("/vanishing") and not gate.is_set():
            asked.set()
            gate.wait(60)  # hold the daemon's first request until the test is ready
        return None

    proxy = FaultProxy(moto.port, plan).start()
    try:
        d = daemons(args=["--endpoint-url", proxy.url, "--lease", "0"])
        uri = f"s3://{bucket}/vanishing"
        out: list = []
        t = threading.Thread(target=lambda: out.append(_resolve_or_error(uri, d.cache_dir)))
        t.start()
        assert asked.wait(60)  # the reader has asked; the daemon is fetching
        fd = os.open(lease_lock(d.cache_dir), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # the reader cannot look until we let it
        try:
            gate.set()
            target = d.cache_dir / bucket / "vanishing"
            wait_for(target.exists, 60, "the file to be published")
            d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the daemon to count it ready")
            target.unlink()  # gone before the reader looks
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        t.join(120)
        assert out and isinstance(out[0], str), out
        assert Path(out[0]).read_bytes() == b"v" * KiB
        assert proxy.gets(f"/{bucket}/vanishing") >= 2  # fetched again because the reader asked again
    finally:
        proxy.stop()


def _resolve_or_error(uri, cache_dir):
    try:
        return resolve(uri, cache_dir=cache_dir, timeout=90)
    except Exception as e:
        return e


def test_reset_closes_the_process_wide_reader_state(tmp_path, s3, bucket, daemons):
    mod = sys.modules["s3cache.reader.resolve"]
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    d = daemons()
    resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120)
    resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120)

    def ours() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.endswith("lease.lock") and str(d.cache_dir.absolute()) in target:
                out.append(target)
        return out

    assert ours()  # the lease lock stays open between calls: cheap resolves
    mod.reset()
    assert ours() == []
    assert mod._resolvers == {}
    assert Path(resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120)).read_bytes() == b"x"
    mod.reset()


@pytest.fixture(autouse=True)
def _fresh_reader_state():
    yield
    mod = sys.modules.get("s3cache.reader.resolve")
    if mod is not None and hasattr(mod, "reset"):
        mod.reset()


@pytest.mark.parametrize("speaks", ["nothing", "one endless line"])
def test_a_daemon_that_never_answers_costs_a_resolve_its_timeout_and_bounded_memory(tmp_path, store, speaks):
    """resolve(timeout=) is a bound: every request gets what is left of it (a want used the client's
    60 s, then explain 5 s more), and a line from the socket is capped (an endless one grew memory)."""
    import socket

    from s3cache.errors import ProtocolError, ResolveTimeout

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(store.layout.control_socket)
    listener.listen(8)
    stop = threading.Event()

    def fake_daemon() -> None:  # whoever bound ctl.sock: accepts, then says nothing or never ends a line
        conns = []
        listener.settimeout(0.01)
        while not stop.is_set():
            try:
                c, _ = listener.accept()
                conns.append(c)
            except TimeoutError:
                pass
            if speaks != "nothing":
                for c in conns:
                    c.setblocking(False)
                    for _ in range(32):
                        try:
                            c.send(b"x" * 65536)
                        except OSError:
                            break
        for c in conns:
            c.close()

    t = threading.Thread(target=fake_daemon)
    t.start()
    try:
        started = time.monotonic()
        with pytest.raises((ResolveTimeout, ProtocolError)):
            resolve("s3://bkt/missing", cache_dir=tmp_path / "cache", timeout=2)
        assert time.monotonic() - started < 20  # 2 s, and a second to ask why: far from the 65 s it took
    finally:
        stop.set()
        t.join(30)
        listener.close()
