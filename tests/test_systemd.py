"""The unit files: `systemd-analyze verify` and the security rating of every one, and that what they
hand the daemon (flags, the example config and environment files) is what serve accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_manifest

from s3cache.cli import main
from s3cache.service.config import options
from s3cache.service.config_sources import load

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
INSTALLED = "/usr/local/bin/s3cache"  # the README's install links the venv's script here
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")


def _instance_name(unit: Path) -> str:
    return unit.name.replace("@.", "@nvme0.")  # a template is checked as one of its instances


def _installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as the README installs it, with ExecStart= pointing at an executable that exists here
    (verify checks it), so the check passes on a clean machine, installed or not."""
    exe = tmp_path / "bin" / "s3cache"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = unit.read_text()
    assert f"ExecStart={INSTALLED} serve" in text
    copy = tmp_path / _instance_name(unit)
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={exe} "))
    return copy


def test_there_are_a_plain_and_a_template_unit():
    assert [u.name for u in UNITS] == ["s3cache.service", "s3cache@.service"]


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies_cleanly(unit, tmp_path):
    copy = _installed_copy(unit, tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values, only warning: any line about our unit is a failure.
    ours = [line for line in (r.stdout + r.stderr).splitlines() if copy.name in line or str(tmp_path) in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_security_rating(unit, tmp_path):
    if "--offline" not in subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True,
                                         text=True, timeout=60).stdout:
        pytest.skip("this systemd-analyze cannot rate a unit file offline (systemd < 250)")
    copy = _installed_copy(unit, tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_runs_serve_as_a_notify_service_with_a_watchdog_and_reload(unit):
    keys = _directives(unit)
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"]
    assert keys["WatchdogSec"] and keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert keys["User"] == ["s3cache"] and keys["Group"] == ["s3cache"]
    assert keys["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]  # S3 and the readers' sockets
    assert keys["CapabilityBoundingSet"] == [""] and keys["MemoryDenyWriteExecute"] == ["yes"]
    # The only writable path is the cache dir, and it is the one serve is told (or defaults to).
    (cache_dir,) = keys["ReadWritePaths"]
    assert keys["CacheDirectory"] == ["s3cache" + cache_dir.removeprefix("/var/cache/s3cache")]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exec_start_flags_are_ones_serve_accepts(unit, tmp_path):
    """The instance's config file and cache dir reach serve as given (checked through `config show`)."""
    (exec_start,) = _directives(unit)["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", "nvme0").replace("/etc/s3cache/", f"{tmp_path}/"))
    assert argv[:2] == [INSTALLED, "serve"]
    (tmp_path / "nvme0.toml").write_text('max_size = "1T"\n')
    r = CliRunner().invoke(main, ["config", "show", *argv[2:]], env={"S3CACHE_CONFIG": None, "S3CACHE_DIR": None})
    assert r.exit_code == 0, r.output
    cache_dir = _directives(unit)["ReadWritePaths"][0].replace("%i", "nvme0")
    assert f'cache_dir = "{cache_dir}"' in " ".join(r.output.split())
    if "@" in unit.name:
        assert f'max_size = "1T" # file:{tmp_path}/nvme0.toml' in " ".join(r.output.split())


def test_example_config_and_environment_files_hold_only_known_settings(tmp_path):
    example = ROOT / "systemd" / "config.toml.example"
    eff = load({}, config=example, environ={})
    assert eff.settings.max_size == 200 << 30 and eff.sources["max_size"] == f"file:{example}"
    known = {name for o in options() for name in o.env}
    env_text = (ROOT / "systemd" / "s3cache.env.example").read_text()
    named = set(re.findall(r"^#?\s*(S3CACHE_\w+)=", env_text, re.MULTILINE))
    assert named and named <= known, named - known


def _directives(unit: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    return keys


def test_no_daemon_memory_is_writable_and_executable(tmp_path, daemons, s3, bucket):
    """The units set MemoryDenyWriteExecute=yes: the daemon, having fetched and served a file, holds no
    mapping that is writable and executable at once (such a mapping would be refused under the unit)."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/k"]))
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    r = CliRunner().invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), f"s3://{bucket}/k"])
    assert r.exit_code == 0, r.output
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text().splitlines()
    assert len(maps) > 50  # the live daemon, with its libraries mapped
    wx = [line for line in maps if "w" in line.split()[1] and "x" in line.split()[1]]
    assert not wx, wx
