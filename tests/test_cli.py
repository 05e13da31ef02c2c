"""The click shell: messages and exit codes at the edge, plus real runs of the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import write_manifest

from s3cache import resolve
from s3cache.cli import EXIT_CODES, exit_code, main, pin_report
from s3cache.errors import (
    ConfigError,
    DaemonNotRunning,
    FetchFailed,
    ManifestError,
    ProtocolError,
    ResolveTimeout,
    S3CacheError,
    UnsafeKey,
)
from s3cache.testing import FAKE_CREDENTIALS

ROOT = Path(__file__).resolve().parent.parent


def test_status_without_a_daemon_is_one_clear_line(tmp_path):
    r = CliRunner().invoke(main, ["status", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 1
    assert "no s3cache daemon serves" in r.output and "Traceback" not in r.output


def test_bad_size_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["serve", "--cache-dir", str(tmp_path), "--max-size", "12Q"])
    assert r.exit_code == 2
    assert "not a size: '12Q'" in r.output


def test_status_and_resolve_against_a_running_daemon(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hi")
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a/b.txt", f"s3://{bucket}/gone"]))
    d.wait_until(lambda st: st["objects"]["ready"] == 1 and st["objects"]["failed"] == 1)
    runner = CliRunner()
    r = runner.invoke(main, ["status", "--cache-dir", str(d.cache_dir), "--json"])
    assert r.exit_code == 0
    st = json.loads(r.output)
    assert st["objects"]["ready"] == 1 and st["failures"][0]["code"] == "NoSuchKey"
    r = runner.invoke(main, ["status", "--cache-dir", str(d.cache_dir)])
    assert "1 ready, 1 failed" in r.output and "gone: NoSuchKey" in r.output
    assert "verified by size alone" not in r.output
    r = runner.invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), f"s3://{bucket}/a/b.txt"])
    assert r.exit_code == 0 and r.output.strip() == str(d.cache_dir.absolute() / bucket / "a" / "b.txt")
    r = runner.invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), "--timeout", "120", f"s3://{bucket}/gone"])
    assert r.exit_code == 1 and "NoSuchKey" in r.output
    r = runner.invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), "not-a-uri"])
    assert r.exit_code == 2 and "not an s3:// URI" in r.output  # bad input: click's usage-error code


def test_exit_codes_are_one_mapping():
    """2 for input the user must change (click's usage-error code), 1 for everything that went wrong."""
    assert exit_code(UnsafeKey("not an s3:// URI")) == 2
    assert exit_code(ConfigError("not a size")) == 2
    assert exit_code(ManifestError("m.txt", 3, "bad field")) == 2
    assert exit_code(FetchFailed("s3://b/k", "NoSuchKey")) == 1
    assert exit_code(DaemonNotRunning("/c")) == 1
    assert exit_code(ResolveTimeout("late")) == 1
    assert exit_code(ProtocolError("skew")) == 1
    assert exit_code(S3CacheError("anything")) == 1

    class Narrower(UnsafeKey):
        pass

    assert exit_code(Narrower("x")) == 2  # a subclass gets its parent's code
    assert set(EXIT_CODES.values()) == {2}


def test_resolve_prints_what_resolved_and_one_line_per_failure(tmp_path, s3, bucket, daemons):
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    d = daemons()
    runner = CliRunner()
    args = ["resolve", "--cache-dir", str(d.cache_dir), "--timeout", "120"]
    r = runner.invoke(main, [*args, f"s3://{bucket}/a", f"s3://{bucket}/gone", f"s3://{bucket}/b"])
    assert r.exit_code == 1, r.output
    root = d.cache_dir.absolute() / bucket
    assert r.stdout.splitlines() == [str(root / "a"), str(root / "b")]
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(f"s3cache: error: s3://{bucket}/gone: NoSuchKey")
    # a malformed URI among them: still every other URI answered, and exit 2 (bad input)
    r = runner.invoke(main, [*args, "s3:/typo", f"s3://{bucket}/a", f"s3://{bucket}/gone2"])
    assert r.exit_code == 2
    assert r.stdout.splitlines() == [str(root / "a")]
    err = r.stderr.splitlines()
    assert len(err) == 2 and "s3:/typo" in err[0] and "not an s3:// URI" in err[0]
    assert err[1].startswith(f"s3cache: error: s3://{bucket}/gone2: NoSuchKey")
    # time running out is reported per URI too, not as one message about the first
    r = runner.invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), "--timeout", "0",
                             f"s3://{bucket}/a", f"s3://{bucket}/slow1"])
    assert r.exit_code == 1 and r.stdout.splitlines() == [str(root / "a")]
    assert len(r.stderr.splitlines()) == 1 and f"s3://{bucket}/slow1" in r.stderr


def test_pin_reply_is_reported_per_uri():
    """What each outcome of the daemon's pin reply prints (the reply shape is documented in cli/objects.py)."""
    reply = {"ok": True, "pinned": 3, "results": [{"uri": "s3://b/new", "outcome": "pinned"},
                                                  {"uri": "s3://b/old", "outcome": "already_pinned"},
                                                  {"uri": "s3://b/m", "outcome": "manifest"}]}
    out, err, code = pin_report("pin", ["s3://b/new", "s3://b/old", "s3://b/m"], reply)
    assert out == ["pinned          s3://b/new", "already pinned  s3://b/old",
                   "already pinned by the manifest s3://b/m", "3 pinned in all"]
    assert err == [] and code == 0
    reply = {"ok": True, "pinned": 1, "results": [{"uri": "s3://b/new", "outcome": "unpinned"},
                                                  {"uri": "s3://b/never", "outcome": "not_pinned"},
                                                  {"uri": "s3://b/m", "outcome": "manifest"}]}
    out, err, code = pin_report("unpin", ["s3://b/new", "s3://b/never", "s3://b/m"], reply)
    assert out == ["unpinned        s3://b/new", "not pinned      s3://b/never", "1 pinned in all"]
    assert err == ["s3cache: error: s3://b/m: pinned by the manifest: edit the manifest to unpin it"]
    assert code == 1
    # a daemon without per-URI results: no claim about what happened to each
    out, err, code = pin_report("unpin", ["s3://b/x"], {"ok": True, "pinned": 0})
    assert out == ["asked the daemon to unpin 1 object(s); 0 pinned in all"] and code == 0


def test_pin_with_a_malformed_uri_changes_nothing(tmp_path, s3, bucket, daemons):
    d = daemons()
    r = CliRunner().invoke(main, ["pin", "--cache-dir", str(d.cache_dir), f"s3://{bucket}/k", "nope"])
    assert r.exit_code == 2 and "not an s3:// URI" in r.stderr and "Traceback" not in r.output
    assert d.status()["pinned"]["files"] == 0 and "refused" not in r.stderr


def test_unpin_says_what_happened_end_to_end(tmp_path, s3, bucket, daemons):
    for k in ("m", "c"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/m pin=1"]))
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    runner = CliRunner()
    args = ["--cache-dir", str(d.cache_dir)]
    r = runner.invoke(main, ["pin", *args, f"s3://{bucket}/c", f"s3://{bucket}/m"])
    assert r.exit_code == 0, r.output
    assert f"pinned          s3://{bucket}/c" in r.stdout
    assert f"already pinned by the manifest s3://{bucket}/m" in r.stdout and "2 pinned in all" in r.stdout
    r = runner.invoke(main, ["unpin", *args, f"s3://{bucket}/c", f"s3://{bucket}/never", f"s3://{bucket}/m"])
    assert r.exit_code == 1
    assert f"unpinned        s3://{bucket}/c" in r.stdout and f"not pinned      s3://{bucket}/never" in r.stdout
    assert f"s3://{bucket}/m: pinned by the manifest: edit the manifest" in r.stderr
    assert "1 pinned in all" in r.stdout


def test_pin_of_an_object_that_does_not_exist_fails_naming_it_and_pins_nothing(tmp_path, s3, bucket, daemons):
    """`s3cache pin` of a missing key used to print "pinned" and exit 0, the failure showing only later
    in status. Now the daemon asks S3 first (one HEAD): the missing key is named and not pinned, the
    others in the same command are, and the exit code says not everything was done."""
    s3.put_object(Bucket=bucket, Key="here", Body=b"x" * 10)
    d = daemons()
    r = CliRunner().invoke(main, ["pin", "--cache-dir", str(d.cache_dir), f"s3://{bucket}/here",
                                  f"s3://{bucket}/no such key"])
    assert r.exit_code == 1, r.output
    assert f"pinned          s3://{bucket}/here" in r.stdout and "1 pinned in all" in r.stdout
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"s3cache: error: s3://{bucket}/no%20such%20key: not pinned: S3 says NoSuchKey"), line
    st = d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the pinned object to land")
    assert st["pinned"]["objects"] == 1 and st["objects"]["failed"] == 0 and st["failures"] == []


def test_text_status_shows_the_shard_off_share_reads_pins_and_leases(tmp_path, s3, bucket, daemons):
    """What was only in --json: this host's share and reads from other shares, pinned files, leases."""
    uris = [f"s3://{bucket}/k{i}" for i in range(4)]
    for u in uris:
        s3.put_object(Bucket=bucket, Key=u.rsplit("/", 1)[1], Body=b"x" * 1000)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris), args=["--shard", "0/2", "--max-size", "64M"])
    d.wait_until(lambda st: st["objects"]["ready"] == 2)  # k0 and k2: this host's share
    runner = CliRunner()
    args = ["--cache-dir", str(d.cache_dir)]
    assert runner.invoke(main, ["pin", *args, uris[0]]).exit_code == 0
    resolve([uris[1], uris[0]], cache_dir=d.cache_dir, timeout=120)  # k1 is the other host's
    d.wait_until(lambda st: st["leases"]["files"] == 2 and st["off_share"]["count"] == 1)
    r = runner.invoke(main, ["status", *args])
    assert r.exit_code == 0, r.output
    lines = {line.split(None, 1)[0]: line for line in r.stdout.splitlines()}
    assert lines["shard"].startswith("shard       0/2: 2 of the manifest's 4 entries; 1 read(s) from other "
                                     "hosts' shares"), lines["shard"]
    assert uris[1] in lines["shard"]
    assert lines["pinned"].startswith("pinned      1 object(s), 1 file cached (1000 B of the 32.0 MiB pin quota)"), \
        lines["pinned"]
    assert lines["leases"].startswith("leases      2 files (2.0 KiB) held for 1 reader(s); budget 2.0 MiB"), \
        lines["leases"]


def test_console_script_runs_for_real(tmp_path, s3, bucket, daemons):
    exe = shutil.which("s3cache", path=os.path.dirname(sys.executable)) or shutil.which("s3cache")
    assert exe, "the s3cache console script is not installed"
    s3.put_object(Bucket=bucket, Key="k", Body=b"real")
    d = daemons()
    r = subprocess.run([exe, "resolve", "--cache-dir", str(d.cache_dir), "--timeout", "120", f"s3://{bucket}/k"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **FAKE_CREDENTIALS})
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == b"real"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "s3cache" in r.stdout


def test_env_file_variables_reach_serve(tmp_path, moto, s3, bucket):
    """The unit passes everything through the environment: serve must read it from there. A broken
    manifest named only by S3CACHE_MANIFEST stops it; then a daemon given nothing but the environment
    serves S3CACHE_DIR, fetches from S3CACHE_ENDPOINT_URL (there is no other S3 here) and holds to
    S3CACHE_MAX_SIZE."""
    from s3cache.testing import DaemonProcess

    m = write_manifest(tmp_path / "m.txt", ["s3://bkt/x size=oops"])
    env = {**os.environ, **FAKE_CREDENTIALS, "S3CACHE_DIR": str(tmp_path / "c"), "S3CACHE_MANIFEST": str(m),
           "S3CACHE_MAX_SIZE": "1G", "S3CACHE_ENDPOINT_URL": moto.url}
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and f"{m}:1:" in r.stderr
    s3.put_object(Bucket=bucket, Key="k", Body=b"from the environment")
    write_manifest(m, [f"s3://{bucket}/k"])
    env.pop("AWS_ENDPOINT_URL", None)
    d = DaemonProcess(tmp_path / "c", moto.url, log_path=tmp_path / "serve.log")
    d.cmd, d.env = [sys.executable, "-m", "s3cache", "serve"], {**env, "S3CACHE_MAX_SIZE": "7M"}
    try:
        st = d.start().wait_until(lambda st: st["objects"]["ready"] == 1, what="the manifest's object")
        assert st["manifest_entries"] == 1
        assert st["bytes"]["max"] == 7 << 20
        assert (tmp_path / "c" / bucket / "k").read_bytes() == b"from the environment"
    finally:
        assert d.stop() == 0


def test_demo_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "s3cache", "demo", "--workdir", str(tmp_path / "demo"),
                        "--shards", "4", "--records", "200", "--images", "40"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo OK: every record read back equals what was written" in r.stdout
    assert "records checked: 800; missing 0; mismatched 0" in r.stdout
    assert "40 JPEGs" in r.stdout and "labels in step: True; wrong pixels: 0" in r.stdout
    # a clean run prints only what the user needs: not a warning the demo's own call causes
    assert "shuffle=True" not in r.stderr and "UserWarning" not in r.stderr, r.stderr
