"""The click shell: messages and exit codes at the edge, plus real runs of the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_manifest
from s3cache.cli import main
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
    assert r.exit_code == 1 and "not an s3:// URI" in r.output


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


def test_env_file_variables_reach_serve(tmp_path, moto):
    """The unit passes everything through the environment: serve must read it from there."""
    m = write_manifest(tmp_path / "m.txt", ["s3://bkt/x size=oops"])
    env = {**os.environ, **FAKE_CREDENTIALS, "S3CACHE_DIR": str(tmp_path / "c"), "S3CACHE_MANIFEST": str(m),
           "S3CACHE_MAX_SIZE": "1G", "S3CACHE_ENDPOINT_URL": moto.url}
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and f"{m}:1:" in r.stderr


def test_demo_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "s3cache", "demo", "--workdir", str(tmp_path / "demo"),
                        "--shards", "4", "--records", "200", "--images", "40"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo OK: every record read back equals what was written" in r.stdout
    assert "records checked: 800; missing 0; mismatched 0" in r.stdout
    assert "40 JPEGs" in r.stdout and "labels in step: True; wrong pixels: 0" in r.stdout
