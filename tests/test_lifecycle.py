"""The daemon's lifecycle end to end: loops that survive real faults, what serve writes to a terminal and
to a pipe, what a daemon that never started logs, and what a hostile key or a secret URL cannot do to
the log and status."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

import pytest
from conftest import write_manifest

from s3cache import resolve
from s3cache.errors import S3CacheError
from s3cache.testing import FAKE_CREDENTIALS, DaemonProcess, wait_for


def fill(path) -> None:
    """Write zeros into ``path`` until its filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


# == 17.3: every loop survives one iteration's exception =============================================


def _index_on_its_own_fs(tmp_path, daemons, small_fs, size="8m"):
    """A cache dir on a small filesystem whose index has a 1 MiB filesystem of its own (bind-mounted
    over ``.s3cache/index``), so a test can fill either. Returns (cache dir, index dir); the caller
    unmounts the index dir (``umount -l``) when done."""
    data = small_fs(size, "data")
    cache = data / "cache"
    daemons(cache).stop()  # makes the cache dir, caches nothing: the index may start empty
    index_dir = cache / ".s3cache" / "index"
    for name in os.listdir(index_dir):
        os.unlink(index_dir / name)
    subprocess.run(["mount", "--bind", str(small_fs("1m", "index")), str(index_dir)], check=True)
    os.chmod(index_dir, 0o700)
    return cache, index_dir


@pytest.mark.unclean_daemon("a full index makes the worker record a loop error: surviving it is the point")
def test_a_full_index_while_evicting_for_a_full_disk_does_not_kill_the_worker(tmp_path, s3, bucket, daemons,
                                                                              small_fs):
    """The data filesystem is full when a reader asks for an object; evicting for it then fails because
    the index's own filesystem is full too ("database or disk is full"). With one worker, a worker killed
    by that would leave nothing to fetch anything again. It must survive: the error counted and logged,
    this attempt failed, and the object fetched when asked again once space returns."""
    for i in range(4):  # evicting them frees more than "new" needs, index reserve included
        s3.put_object(Bucket=bucket, Key=f"old/{i}", Body=os.urandom(1 << 20))
    s3.put_object(Bucket=bucket, Key="new", Body=os.urandom(2 << 20))
    cache, index_dir = _index_on_its_own_fs(tmp_path, daemons, small_fs)
    data = cache.parent
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/old/{i}" for i in range(4)])
    args = ["--workers", "1", "--lease", "0", "--min-free", "0", "--max-size", "100M"]
    try:
        d = daemons(cache, manifest=m, args=args)
        d.wait_until(lambda st: st["objects"]["ready"] == 4)
        fill(data / "filler")
        fill(index_dir / "filler")
        # "new" replaces the manifest: the old files become evictable. Prefetch only goes into free room
        # (admission counts the filesystem), so a reader asks for it: its admission evicts for disk room,
        # and the eviction's index write fails on the full index filesystem.
        write_manifest(m, [f"s3://{bucket}/new"])
        with pytest.raises(S3CacheError):  # this attempt fails: the eviction it needed could not commit
            resolve(f"s3://{bucket}/new", cache_dir=cache, timeout=240)
        st = d.wait_until(lambda st: st["loop_errors"].get("workers", 0) >= 1,
                          what="the eviction that failed on the full index to be counted")
        log = d.log()
        assert "database or disk is full" in log
        assert "thread died" not in log
        os.unlink(index_dir / "filler")
        os.unlink(data / "filler")
        # the worker carried on: asked again, the object is fetched
        p = resolve(f"s3://{bucket}/new", cache_dir=cache, timeout=240)
        assert os.path.getsize(p) == 2 << 20
        assert d.proc.poll() is None
    finally:
        subprocess.run(["umount", "-l", str(index_dir)], capture_output=True)


@pytest.mark.unclean_daemon("a full index makes housekeeping record a loop error: surviving it is the point")
def test_housekeeping_survives_a_full_index_and_says_so_once(tmp_path, s3, bucket, daemons, small_fs):
    """The index's filesystem fills under a running daemon: readers' usage notes cannot reach the index.
    Housekeeping logs it once (not a traceback a second), counts each failure, and carries on; once
    there is room again, the daemon still fetches and serves."""
    s3.put_object(Bucket=bucket, Key="a", Body=b"a" * 1000)
    cache, index_dir = _index_on_its_own_fs(tmp_path, daemons, small_fs)
    try:
        d = daemons(cache, manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a"]))
        d.wait_until(lambda st: st["objects"]["ready"] == 1)
        fill(index_dir / "filler")
        for k in range(1, 4):  # each resolve is a usage note, each note a write the index refuses
            resolve(f"s3://{bucket}/a", cache_dir=cache, timeout=60)
            d.wait_until(lambda st: st["loop_errors"].get("housekeeping", 0) >= k,
                         what=f"failed usage write {k} to be counted")
        assert d.proc.poll() is None
        log = d.log()
        assert log.count("housekeeping: writing usage to the index failed, carrying on") == 1
        assert log.count("Traceback") == 1
        os.unlink(index_dir / "filler")
        s3.put_object(Bucket=bucket, Key="b", Body=b"b" * 10)
        assert open(resolve(f"s3://{bucket}/b", cache_dir=cache, timeout=120), "rb").read() == b"b" * 10
    finally:
        subprocess.run(["umount", "-l", str(index_dir)], capture_output=True)


# == 13.3 / 19: serve on a terminal draws a bar; elsewhere, plain progress lines ======================


def _serve_cmd(cache, moto, manifest) -> list[str]:
    return [sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(cache), "--endpoint-url", moto.url,
            "--manifest", str(manifest)]


def _objects(s3, bucket, n=3, size=300_000) -> list[str]:
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"p/{i}", Body=os.urandom(size))
    return [f"s3://{bucket}/p/{i}" for i in range(n)]


def test_serve_on_a_terminal_draws_a_progress_bar(tmp_path, moto, s3, bucket):
    m = write_manifest(tmp_path / "m.txt", _objects(s3, bucket))
    master, slave = pty.openpty()
    proc = subprocess.Popen(_serve_cmd(tmp_path / "cache", moto, m), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env={**os.environ, **FAKE_CREDENTIALS, "TERM": "xterm-256color",
                                               "COLUMNS": "120"}, start_new_session=True)
    os.close(slave)
    out = bytearray()
    try:
        def drawn():
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    out.extend(os.read(master, 65536))
                except OSError:
                    pass
            return b"3/3 ready" in out
        wait_for(drawn, 120, "the bar to show 3/3 ready")
    finally:
        proc.terminate()
        proc.wait(60)
        os.close(master)
    text = out.decode(errors="replace")
    assert "━" in text  # rich's bar
    assert "objects" in text and "bytes" in text
    assert "\x1b[" in text  # a terminal gets cursor control: the bar redraws in place


def test_serve_to_a_pipe_writes_plain_progress_lines(tmp_path, moto, s3, bucket):
    m = write_manifest(tmp_path / "m.txt", _objects(s3, bucket))
    proc = subprocess.Popen(_serve_cmd(tmp_path / "cache", moto, m), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **FAKE_CREDENTIALS, "TERM": "xterm-256color"})
    lines: list[str] = []
    import threading
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(re.search(r"INFO s3cache\.daemon: progress: 3/3 objects, .* of .*/s$", x.rstrip())
                             for x in lines), 120, "a progress line for 3/3")
    finally:
        proc.terminate()
        proc.wait(60)
        reader.join(60)
    out = "".join(lines)
    assert "\x1b" not in out  # no colour, no cursor movement
    assert "━" not in out
    # one event a line: every line starts with a timestamp and a level
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", x)
               for x in out.splitlines()), out


def test_progress_lines_come_every_few_seconds_while_work_is_pending(tmp_path, s3, bucket, daemons):
    """Work that stays pending (prefetch paused: the filesystem's free fraction is below --min-free):
    the log gets an INFO progress line every few seconds, not only at debug level."""
    uris = _objects(s3, bucket, n=3, size=4000)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris), args=["--min-free", "0.999"])

    def lines():
        return re.findall(r"^\S+ \S+ INFO s3cache\.daemon: progress: 0/3 objects, 0 B( of [^,]+)?, 0 B/s$", d.log(), re.M)

    try:
        wait_for(lambda: len(lines()) >= 3, 120, "three progress lines")
    except TimeoutError:
        raise AssertionError(d.log()) from None
    st = d.status()
    assert st["objects"]["queued"] == 3 and st["objects"]["ready"] == 0  # it was pending all along


# == 19: a daemon that never started; quiet readers ===================================================


def test_a_manifest_error_is_not_preceded_by_stopped(tmp_path, moto):
    m = tmp_path / "m.txt"
    m.write_text("s3://b-ok/k size=12x\n")
    r = subprocess.run(_serve_cmd(tmp_path / "cache", moto, m), capture_output=True, text=True, timeout=120,
                       env={**os.environ, **FAKE_CREDENTIALS})
    assert r.returncode == 2
    assert f"{m}:1" in r.stderr
    assert "stopped" not in r.stderr, r.stderr


# == 18.8 / 18.9: keys cannot forge log lines; URLs' passwords never shown ============================


def test_a_hostile_key_is_escaped_in_the_log_and_status_text(tmp_path, s3, bucket, daemons):
    key = "x\n2024-01-01 00:00:00,000 ERROR s3cache.daemon: forged\x1b]0;owned\x07"
    d = daemons()
    uri = f"s3://{bucket}/{key}"
    with pytest.raises(S3CacheError):
        resolve(uri, cache_dir=d.cache_dir, timeout=60)  # NoSuchKey: logged with the URI
    d.wait_until(lambda st: st["objects"]["failed"] == 1)
    log = d.log()
    assert "\x1b" not in log and "\x07" not in log
    assert not re.search(r"^\S+ \S+ ERROR s3cache\.daemon: forged", log, re.M), log
    assert "x\\n2024-01-01 00:00:00,000 ERROR s3cache.daemon: forged\\x1b]0;owned\\x07" in log
    r = subprocess.run([sys.executable, "-m", "s3cache", "status", "--cache-dir", str(d.cache_dir)],
                       capture_output=True, text=True, timeout=60)
    # status shows URIs in the one form users paste back (percent-encoded, as in a manifest): no raw
    # control character reaches the terminal
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "forged%1B%5D0%3Bowned%07" in r.stdout, r.stdout


def test_an_endpoint_password_never_reaches_status_or_the_log(tmp_path, moto):
    secret_url = "http://user:secret@127.0.0.1:1"
    d = DaemonProcess(tmp_path / "cache", moto.url, args=["--max-attempts", "1", "--connect-timeout", "1"],
                      log_path=tmp_path / "d.log",
                      env={"S3CACHE_ENDPOINT_URL": secret_url, "S3CACHE_ALLOW": "s3://"})  # in demand scope
    i = d.cmd.index("--endpoint-url")
    del d.cmd[i:i + 2]  # the endpoint comes from the environment alone
    d.start()
    try:
        with pytest.raises(S3CacheError):
            resolve("s3://some-bucket/k", cache_dir=d.cache_dir, timeout=60)
        st = d.wait_until(lambda st: st["objects"]["failed"] == 1)
        assert "127.0.0.1:1" in st["failures"][0]["message"]  # the endpoint is named, its password is not
        assert "secret" not in repr(st)
        r = subprocess.run([sys.executable, "-m", "s3cache", "status", "--cache-dir", str(d.cache_dir)],
                           capture_output=True, text=True, timeout=60)
        assert "secret" not in r.stdout + r.stderr
    finally:
        d.stop()
    assert "secret" not in d.log() and "user:***@" in d.log()
