"""Settings: sizes, the one table of serve's options, its layers (flag > environment > file > default),
its errors, `config show`, and a real daemon configured by a file."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_manifest

from s3cache.cli import main
from s3cache.errors import ConfigError
from s3cache.service import config_sources
from s3cache.service.config import (
    TEXT,
    Settings,
    human_size,
    options,
    parse_size,
    setting,
)
from s3cache.service.config_sources import load


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("1024", 1024), ("500G", 500 << 30), ("1.5T", int(1.5 * (1 << 40))), ("64MiB", 64 << 20),
    ("8m", 8 << 20), (" 2K ", 2048), (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "12Q", "-5", "1.2.3G", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


def test_settings_validation(tmp_path):
    with pytest.raises(ConfigError, match="--max-size"):
        Settings(cache_dir=tmp_path, max_size=0)
    with pytest.raises(ConfigError, match="--workers"):
        Settings(cache_dir=tmp_path, workers=0)
    assert Settings(cache_dir=tmp_path, max_size=8 << 30).readahead_bytes == 1 << 30


def test_human_size():
    assert human_size(10) == "10 B"
    assert human_size(1536) == "1.5 KiB"


# == the table, the layers and `config show` ==========================================================



@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch):
    """The tests set the variables they mean; none leak in from the shell that runs them."""
    for opt in options():
        for name in opt.env:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(config_sources.CONFIG_ENV, raising=False)
    monkeypatch.setattr(config_sources, "DEFAULT_CONFIG", Path("/nonexistent/s3cache/config.toml"))


def show(args, env=None):
    r = CliRunner().invoke(main, ["config", "show", "--json", *args], env=env)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_precedence_is_flag_then_environment_then_file_then_default(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text('max_size = "1G"\nworkers = 8\nlease = 30\n')
    got = show(["--config", str(f), "--workers", "4"], env={"S3CACHE_MAX_SIZE": "2G", "S3CACHE_WORKERS": "6"})
    assert got["workers"] == {"value": 4, "source": "flag"}
    assert got["max_size"] == {"value": "2G", "source": "env:S3CACHE_MAX_SIZE"}
    assert got["lease"] == {"value": 30.0, "source": f"file:{f}"}
    assert got["part_size"] == {"value": "16M", "source": "default"}
    assert got["manifest"] == {"value": None, "source": "default"}


def test_a_second_environment_name_counts_and_the_first_wins():
    got = show([], env={"AWS_ENDPOINT_URL": "http://a:9000", "AWS_REGION": "eu-west-1"})
    assert got["endpoint_url"] == {"value": "http://a:9000", "source": "env:AWS_ENDPOINT_URL"}
    assert got["region"]["source"] == "env:AWS_REGION"
    got = show([], env={"AWS_ENDPOINT_URL": "http://a:9000", "S3CACHE_ENDPOINT_URL": "http://b:9000"})
    assert got["endpoint_url"] == {"value": "http://b:9000", "source": "env:S3CACHE_ENDPOINT_URL"}


def test_config_file_from_environment_and_the_default_path(tmp_path, monkeypatch):
    f = tmp_path / "a.toml"
    f.write_text("workers = 3\n")
    assert show([], env={"S3CACHE_CONFIG": str(f)})["workers"] == {"value": 3, "source": f"file:{f}"}
    assert show([])["workers"]["source"] == "default"  # the default path does not exist: no file
    monkeypatch.setattr(config_sources, "DEFAULT_CONFIG", f)
    assert show([])["workers"] == {"value": 3, "source": f"file:{f}"}


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "etc").mkdir()
    f = tmp_path / "etc" / "config.toml"
    f.write_text('manifest = "m.txt"\ncache_dir = "/srv/cache"\n')
    got = show(["--config", str(f)])
    assert got["manifest"]["value"] == str(tmp_path / "etc" / "m.txt")
    assert got["cache_dir"]["value"] == "/srv/cache"


@pytest.mark.parametrize("text,message", [
    ('max-size = "1G"\n', "unknown key 'max-size' (did you mean 'max_size'?)"),
    ('colour = "blue"\n', "unknown key 'colour' (known keys: cache_dir, manifest, max_size"),
    ('workers = "many"\n', "key 'workers': not an integer: 'many'"),
    ("workers = true\n", "key 'workers': not an integer: True"),
    ("workers = 0\n", "key 'workers': must be between 1 and 512: 0"),
    ('max_size = "12Q"\n', "key 'max_size': not a size: '12Q' (use bytes or a number with K, M, G, T"),
    ('part_size = "4K"\n', "key 'part_size': must be at least 1M: 4096"),
    ("min_free = 1.5\n", "key 'min_free': must be between 0 and 1 (a fraction, e.g. 0.05): 1.5"),
    ('readahead = "lots"\n', "key 'readahead': not a readahead: 'lots' (bytes such as 2G, or a number of files"),
    ('log_level = "loud"\n', "key 'log_level': not one of debug, info, warning, error: 'loud'"),
    ('endpoint_url = "minio:9000"\n', "key 'endpoint_url': not an http(s) URL: 'minio:9000'"),
    ("manifest = 3\n", "key 'manifest': not a path: 3"),
    ("[serve]\nworkers = 4\n", "unknown key 'serve'"),
    ("workers = = 4\n", "not valid TOML: Invalid value (at line 1, column 11)"),
])
def test_bad_file_names_the_file_the_key_and_the_form(tmp_path, text, message):
    f = tmp_path / "config.toml"
    f.write_text(text)
    r = CliRunner().invoke(main, ["serve", "--config", str(f), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2, r.output
    assert f"s3cache: error: {f}: {message}" in r.output, r.output
    assert not (tmp_path / "c").exists()  # refused before the daemon touched anything


def test_bad_environment_variable_and_missing_file_are_errors(tmp_path):
    r = CliRunner().invoke(main, ["config", "show"], env={"S3CACHE_LEASE": "soon"})
    assert r.exit_code == 2 and "environment variable S3CACHE_LEASE: not a number: 'soon'" in r.output
    r = CliRunner().invoke(main, ["config", "show", "--config", str(tmp_path / "none.toml")])
    assert r.exit_code == 2 and f"{tmp_path / 'none.toml'}: no such configuration file" in r.output
    (tmp_path / "bin.toml").write_bytes(b"workers = 4\n\xff\xfe\n")
    r = CliRunner().invoke(main, ["config", "show", "--config", str(tmp_path / "bin.toml")])
    assert r.exit_code == 2 and "bin.toml: not UTF-8 text" in r.output
    r = CliRunner().invoke(main, ["config", "show", "--workers", "0"])
    assert r.exit_code == 2 and "Invalid value for '--workers': must be between 1 and 512: 0" in r.output


def test_an_empty_environment_variable_counts_as_unset(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('endpoint_url = "http://file:9000"\n')
    got = show(["--config", str(f)], env={"S3CACHE_ENDPOINT_URL": ""})
    assert got["endpoint_url"] == {"value": "http://file:9000", "source": f"file:{f}"}


def test_show_never_prints_a_password_in_the_endpoint_url(tmp_path):
    for args, env in ((["--endpoint-url", "https://key:hunter2@minio:9000/"], None),
                      ([], {"S3CACHE_ENDPOINT_URL": "https://key:hunter2@minio:9000/"})):
        for fmt in ([], ["--json"]):
            r = CliRunner().invoke(main, ["config", "show", *fmt, *args], env=env)
            assert r.exit_code == 0, r.output
            assert "hunter2" not in r.output and "https://key:***@minio:9000/" in r.output
    f = tmp_path / "c.toml"
    f.write_text('endpoint_url = "minio:hunter2"\n')
    r = CliRunner().invoke(main, ["config", "show", "--config", str(f)])
    assert r.exit_code == 2 and "not an http(s) URL" in r.output


@dataclass(frozen=True)
class _WithSecret:
    """A table with a secret row: `show` prints only that it is set, and where from."""

    name: str | None = setting(TEXT, None, "A name.")
    token: str | None = setting(TEXT, None, "An access token.", secret=True)


def test_a_secret_option_is_shown_as_set_never_its_value(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('token = "tok-0123456789"\nname = "n1"\n')
    eff = load({}, config=f, environ={}, table=_WithSecret)
    assert eff.settings.token == "tok-0123456789"
    text = "\n".join(eff.show()) + eff.as_json()
    assert "tok-0123456789" not in text
    assert f"# token = (secret, set)  # file:{f}" in eff.show()
    assert json.loads(eff.as_json())["token"] == {"value": None, "secret": True, "set": True,
                                                   "source": f"file:{f}"}
    eff = load({}, config=f, environ={"S3CACHE_TOKEN": "tok-env"}, table=_WithSecret)
    assert eff.settings.token == "tok-env" and eff.sources["token"] == "env:S3CACHE_TOKEN"


# Every option with a value unlike its default, as a flag would give it.
NON_DEFAULTS = {
    "cache_dir": "/srv/c", "manifest": "/srv/m.txt", "max_size": "3G", "workers": "5", "part_size": "2M",
    "prefetch_part_size": "8M", "lease": "12.5", "readahead": "7f", "min_free": "0.2", "low_watermark": "0.5",
    "endpoint_url": "http://s3.local:9000", "region": "eu-north-1", "read_timeout": "4", "connect_timeout": "3",
    "max_attempts": "2", "revalidate": "60", "log_level": "debug", "shard": "3/8",
    "metrics_addr": "127.0.0.1:9200", "metrics_allow_remote": "true", "require_checksum": "true",
    "transport": "botocore",
    "world_readable": "true", "pin_quota": "0.25", "manifest_settle": "1.5", "allow": "s3://b-1/x/",
    "peers": "10.0.0.1:7480,10.0.0.2:7480", "peer_addr": "10.0.0.1:7480", "peer_secret_file": "/srv/peer-secret",
    "peer_timeout": "3.5", "peer_rate": "100M",
}


# Options that exclude one in NON_DEFAULTS: checked on their own (the same way) below.
INSTEAD = {"manifest_dir"}  # instead of "manifest"


def test_every_option_is_a_flag_a_variable_and_a_key_and_show_reads_back(tmp_path):
    names = [o.name for o in options() if o.name not in INSTEAD]
    assert sorted(names + list(INSTEAD)) == sorted([*NON_DEFAULTS, *INSTEAD]), "add the new option to NON_DEFAULTS"
    flags = [a for n in names for a in ((f"--{n.replace('_', '-')}",) if NON_DEFAULTS[n] == "true"
                                         else (f"--{n.replace('_', '-')}", NON_DEFAULTS[n]))]
    by_flag = show(flags)
    assert all(row["source"] == "flag" for n, row in by_flag.items() if n not in INSTEAD)
    env = {o.env[0]: NON_DEFAULTS[o.name] for o in options() if o.name not in INSTEAD}
    by_env = show([], env=env)
    assert {k: v["value"] for k, v in by_env.items()} == {k: v["value"] for k, v in by_flag.items()}
    env_of = {o.name: o.env[0] for o in options()}
    assert all(by_env[n]["source"] == f"env:{env_of[n]}" for n in names)
    # `config show`'s text output is a TOML file that gives the same settings again.
    r = CliRunner().invoke(main, ["config", "show", *flags])
    f = tmp_path / "shown.toml"
    f.write_text(r.output)
    by_file = show(["--config", str(f)])
    assert {k: v["value"] for k, v in by_file.items()} == {k: v["value"] for k, v in by_flag.items()}
    assert all(row["source"] == f"file:{f}" for n, row in by_file.items() if n not in INSTEAD)
    assert by_flag["max_size"]["value"] == "3G" and by_flag["readahead"]["value"] == "7f"


def test_manifest_dir_is_a_flag_a_variable_and_a_key_instead_of_manifest(tmp_path):
    by_flag = show(["--manifest-dir", "/srv/jobs"])
    assert by_flag["manifest_dir"] == {**by_flag["manifest_dir"], "value": "/srv/jobs", "source": "flag"}
    assert show([], env={"S3CACHE_MANIFEST_DIR": "/srv/jobs"})["manifest_dir"]["value"] == "/srv/jobs"
    f = tmp_path / "c.toml"
    f.write_text('manifest_dir = "/srv/jobs"\n')
    assert show(["--config", str(f)])["manifest_dir"]["value"] == "/srv/jobs"
    r = CliRunner().invoke(main, ["config", "show", "--manifest", "/srv/m.txt", "--manifest-dir", "/srv/jobs"])
    assert r.exit_code != 0 and "--manifest and --manifest-dir both given" in r.output


def test_serve_help_lists_every_option_with_its_variable_and_key():
    r = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for o in options():
        assert o.flag in text and f"file key: {o.name}" in text
        for name in o.env:
            assert f"${name}" in text
    assert "$S3CACHE_CONFIG" in text and "/etc/s3cache/config.toml" in text
    assert "Without --manifest, objects are fetched on demand only" in text


def test_the_file_reaches_a_real_daemon(tmp_path, daemons, s3, bucket):
    """A daemon configured by a file: its manifest (a path relative to the file) and its max size."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"from the file")
    (tmp_path / "etc").mkdir()
    write_manifest(tmp_path / "etc" / "m.txt", [f"s3://{bucket}/k"])
    f = tmp_path / "etc" / "config.toml"
    f.write_text('manifest = "m.txt"\nmax_size = "3G"\nworkers = 2\n')
    d = daemons(args=["--config", str(f)])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 1)
    assert st["manifest"] == str(tmp_path / "etc" / "m.txt")
    assert st["bytes"]["max"] == 3 << 30


def test_console_script_config_show(tmp_path):
    exe = shutil.which("s3cache", path=os.path.dirname(sys.executable)) or shutil.which("s3cache")
    assert exe, "the s3cache console script is not installed"
    f = tmp_path / "config.toml"
    f.write_text('max_size = "200G"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3CACHE_", "AWS_"))}
    r = subprocess.run([exe, "config", "show", "--config", str(f), "--lease", "60"], capture_output=True,
                       text=True, timeout=60, env={**env, "S3CACHE_WORKERS": "4"})
    assert r.returncode == 0, r.stderr
    lines = {line.split("=")[0].strip(): line for line in r.stdout.splitlines() if not line.startswith("#")}
    assert lines["max_size"].endswith(f'= "200G"  # file:{f}')
    assert lines["workers"].endswith("= 4  # env:S3CACHE_WORKERS")
    assert lines["lease"].endswith("= 60.0  # flag")
    assert lines["part_size"].endswith('= "16M"  # default')
    r = subprocess.run([exe, "serve", "--config", str(f), "--workers", "lots"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2 and "'--workers': not an integer: 'lots'" in r.stderr
