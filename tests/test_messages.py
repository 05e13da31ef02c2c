"""Errors name their object once (issue 19): a failure is reported beside its URI, so its message does
not repeat it ("failed s3://x: ChecksumMismatch: s3://x: ..." said it twice)."""

from __future__ import annotations

import grp
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import write_manifest

from s3cache import resolve
from s3cache.errors import S3CacheError


def test_a_failure_names_its_object_once_in_status_and_the_log(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"real bytes")
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    uri = f"s3://{bucket}/k"
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"{uri} sha256={wrong}"]))
    st = d.wait_until(lambda st: st["objects"]["failed"] == 1, what="the wrong checksum to fail")
    (f,) = st["failures"]
    assert f["uri"] == uri and f["code"] in ("ChecksumMismatch", "WrongChecksum")
    assert uri not in f["message"] and wrong in f["message"], f
    line = next(x for x in d.log().splitlines() if "ERROR" in x and "failed" in x)
    assert line.count(uri) == 1, line
    with pytest.raises(S3CacheError) as ei:
        resolve(uri, cache_dir=d.cache_dir, timeout=60)
    assert str(ei.value).count(uri) == 1, str(ei.value)


def test_a_digest_given_in_base64_is_named_in_base64_too(tmp_path, s3, bucket, daemons):
    """Issue 19: an md5 given in base64 (as S3 prints it) was reported only in hex."""
    import base64

    s3.put_object(Bucket=bucket, Key="k", Body=b"real bytes")
    wrong = base64.b64encode(hashlib.md5(b"other bytes").digest()).decode()
    uri = f"s3://{bucket}/k"
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"{uri} md5={wrong}"]))
    st = d.wait_until(lambda st: st["objects"]["failed"] == 1, what="the wrong md5 to fail")
    msg = st["failures"][0]["message"]
    assert f"(base64 {wrong})" in msg and hashlib.md5(b"other bytes").hexdigest() in msg, msg


@pytest.fixture
def shared_cache():
    """A cache dir another local user could reach if in its group: under a sticky world-writable dir
    (pytest's tmp_path is 0700), owned by root and a group made for the test."""
    top = Path(tempfile.mkdtemp(prefix="s3ct-shared-", dir="/tmp"))
    os.chmod(top, 0o1777)
    group = "s3ctg" + uuid.uuid4().hex[:6]
    made = subprocess.run(["groupadd", group], capture_output=True).returncode == 0
    cache = top / "cache"
    cache.mkdir(mode=0o750)
    if made:
        os.chown(cache, 0, grp.getgrnam(group).gr_gid)
    yield cache, group
    shutil.rmtree(top, ignore_errors=True)
    if made:
        subprocess.run(["groupdel", group], capture_output=True)


def test_a_reader_outside_the_caches_group_gets_a_typed_error_with_the_fix(
        local_user, shared_cache, s3, bucket, daemons):
    """A user not in the cache dir's group met a bare PermissionError on .s3cache/lease.lock; now it is
    an S3CacheError (CacheAccessDenied) naming the path, the group and how to join it, from the library
    and from the CLI alike (exit 1, one line)."""
    cache, group = shared_cache
    outsider = local_user()
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    d = daemons(cache)
    uri = f"s3://{bucket}/k"
    script = ("import s3cache\n"
              "try:\n"
              f"    s3cache.resolve({uri!r}, cache_dir={str(cache)!r}, timeout=30)\n"
              "except s3cache.S3CacheError as e:\n"
              "    print(type(e).__name__, isinstance(e, s3cache.PermissionDenied), e)\n")
    r = outsider.run([sys.executable, "-c", script], timeout=120)
    assert r.returncode == 0 and not r.stderr, r.stderr  # no traceback: the error was an S3CacheError
    assert r.stdout.startswith("CacheAccessDenied True permission denied on "), r.stdout
    assert f"{cache}/.s3cache/lease.lock" in r.stdout and f"its group '{group}'" in r.stdout, r.stdout
    assert f"usermod -aG {group} USER" in r.stdout, r.stdout
    r = outsider.run([sys.executable, "-m", "s3cache", "resolve", "--cache-dir", str(cache), uri], timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "join the daemon's group" in r.stderr, r.stderr
    assert d.status()["objects"]["failed"] == 0


def test_the_control_sockets_permission_error_is_the_same_typed_error(local_user, shared_cache, daemons):
    """The socket hint in reader/client.py, reached: a user who can see .s3cache but not open ctl.sock."""
    cache, group = shared_cache
    outsider = local_user()
    d = daemons(cache)
    sock = d.cache_dir / ".s3cache" / "ctl.sock"
    script = ("from s3cache.reader.client import Client\n"
              "from s3cache.errors import CacheAccessDenied\n"
              "try:\n"
              f"    Client({str(sock)!r}, {str(cache)!r})\n"
              "except CacheAccessDenied as e:\n"
              "    print(e)\n")
    r = outsider.run([sys.executable, "-c", script], timeout=120)
    # the outsider cannot even traverse the 0750 cache dir: connect() fails with EACCES
    assert r.returncode == 0 and f"permission denied on {sock}" in r.stdout, (r.stdout, r.stderr)


def _flat(text: str) -> str:
    return " ".join(text.split())  # help text as read, whatever column click wrapped it at


def test_help_says_what_readahead_and_lease_really_do():
    """--readahead said "0: 1/8 of max-size" (the window is at most 1/16 of the files the cache holds,
    policy/evict.py); --lease said a resolved file is protected that long (only a reader's two newest
    files are, and older ones within a budget)."""
    from click.testing import CliRunner

    from s3cache.cli import main
    from s3cache.policy.evict import READAHEAD_SHARE
    from s3cache.policy.leases import LEASE_SHARE

    out = _flat(CliRunner().invoke(main, ["serve", "--help"]).output)
    assert "1/8" not in out
    assert f"at most 1/{READAHEAD_SHARE} of the files the cache holds; 0: that most" in out, out
    assert f"its two newest resolved files are kept that long" in out and f"1/{LEASE_SHARE} of max-size" in out


def test_an_unreachable_endpoint_is_named(monkeypatch):
    """`s3cache manifest` against an endpoint nobody listens on said "cannot reach the S3 endpoint"
    without saying which one."""
    from click.testing import CliRunner

    from s3cache.cli import main
    from s3cache.testing import FAKE_CREDENTIALS, free_port

    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = f"http://127.0.0.1:{free_port()}"
    r = CliRunner().invoke(main, ["manifest", "s3://some-bucket/p/", "--endpoint-url", url])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = r.stderr.splitlines()
    assert "EndpointUnreachable" in line and f"cannot reach the S3 endpoint {url}/some-bucket" in line, line


def test_an_error_names_an_odd_uri_once(tmp_path, s3, bucket, daemons):
    """`s3cache resolve 's3://b/odd/with space#hash.txt'` printed the URI as given and again as the
    daemon spells it ("...with space#hash.txt: s3://.../with%20space%23hash.txt: OutOfScope ...")."""
    from click.testing import CliRunner

    from s3cache.cli import main

    d = daemons(args=["--allow", f"s3://{bucket}/in/"])
    r = CliRunner().invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), "--timeout", "60",
                                  f"s3://{bucket}/odd/with space#hash.txt"])
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"s3cache: error: s3://{bucket}/odd/with%20space%23hash.txt: OutOfScope"), line
    assert line.count("hash") == 1, line
