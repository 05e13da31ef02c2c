"""What ``s3cache serve`` never imports on its way to serving (docs/benchmarks.md, start-up): the readers'
resolve code (the package root exports it lazily), and the TOML parser and difflib when no configuration
file is read. Each is checked inside a real ``serve`` once it answers, with the cyclic GC, paused while
the daemon's modules load, running again and those modules frozen out of it; and the package's public
names still work for the readers who use them. And the S3 client's models decode as botocore's do, into
plain dicts (what an OrderedDict per JSON object cost of every start)."""

from __future__ import annotations

import os
import subprocess
import sys

from test_startup_cost import serving_report

# Modules the daemon must not have loaded once serving (without --config and with no default file).
UNUSED = ("s3cache.reader.resolve", "s3cache.reader.workers", "tomllib", "difflib")

# Runs ``s3cache serve`` (argv) in this process and, once the daemon answers hello, prints which of
# UNUSED it has loaded: seen from inside the real serve, through imports of its own only.
_REPORT_ONCE_SERVING = f"""
import gc, sys, threading, time
from s3cache.cli import main

UNUSED = {UNUSED!r}

def report():
    from s3cache.errors import S3CacheError
    from s3cache.sockets.control import Client
    from s3cache.store.layout import Layout
    cache = sys.argv[sys.argv.index("--cache-dir") + 1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with Client(Layout(cache).control_socket, cache, timeout=5) as c:
                if c.request({{"op": "hello"}}).get("ok"):
                    break
        except (S3CacheError, OSError):
            pass
        time.sleep(0.05)
    print(f"serving: loaded={{sorted(m for m in UNUSED if m in sys.modules)}} gc={{gc.isenabled()}} "
          f"frozen={{gc.get_freeze_count() > 10000}}", flush=True)

threading.Thread(target=report, daemon=True).start()
sys.argv[0] = "s3cache"
main()
"""


def test_serve_loads_neither_the_readers_resolve_nor_the_toml_parser(tmp_path, moto, s3, bucket, monkeypatch):
    """The package root imported resolve (and with it the readers' code) for every ``s3cache.<x>``
    import, the daemon's included; config_sources imported tomllib and difflib for a file most starts
    do not have. A daemon serves and fetches as ever without any of them, its GC on again and the
    daemon's modules (tens of thousands of objects) frozen out of it."""
    monkeypatch.delenv("S3CACHE_CONFIG", raising=False)
    line = serving_report(tmp_path, moto, s3, bucket, _REPORT_ONCE_SERVING, "serving: loaded")
    assert line == "serving: loaded=[] gc=True frozen=True", line


def test_the_package_still_exports_resolve_and_loads_it_on_first_use():
    """``from s3cache import resolve`` and ``s3cache.resolve`` are the readers' functions, loaded when
    first asked for (not by ``import s3cache``); an unknown name is an AttributeError as before."""
    code = (
        "import sys, s3cache\n"
        "assert 's3cache.reader.resolve' not in sys.modules, 'loaded by import s3cache'\n"
        "from s3cache import iter_resolve, resolve, worker_share\n"
        "import s3cache.reader.resolve as r, s3cache.reader.workers as w\n"
        "assert (resolve, iter_resolve, worker_share) == (r.resolve, r.iter_resolve, w.worker_share)\n"
        "assert s3cache.resolve is r.resolve and {'resolve', 'worker_share'} <= set(dir(s3cache))\n"
        "assert all(hasattr(s3cache, name) for name in s3cache.__all__)\n"
        "try:\n"
        "    s3cache.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_s3_client_models_decode_as_botocores_in_plain_dicts(tmp_path, monkeypatch):
    """The loader's file loader decodes each model the S3 client reads (S3's service model, its endpoint
    ruleset, their extras, the partitions, the SDK defaults) into plain dicts equal, in order too, to
    what botocore's own decodes into OrderedDicts; and it looks for NAME.json, then NAME.json.gz, as
    botocore's does (a file on AWS_DATA_PATH in either form)."""
    import gzip
    import json
    from collections import OrderedDict

    import botocore.loaders

    from s3cache.fetch.s3loader import PlainJSON, S3Loader

    ours, theirs = S3Loader.create(None), botocore.loaders.Loader()
    assert isinstance(ours.file_loader, PlainJSON)
    for name in ("sdk-default-configuration", "partitions"):
        mine, builtin = ours.load_data(name), theirs.load_data(name)
        assert type(mine) is dict and json.dumps(mine) == json.dumps(builtin), name
    for kind in ("service-2", "endpoint-rule-set-1"):
        mine, builtin = ours.load_service_model("s3", kind), theirs.load_service_model("s3", kind)
        assert type(mine) is dict and isinstance(builtin, OrderedDict)
        assert json.dumps(mine) == json.dumps(builtin), kind
    (tmp_path / "plain.json").write_text('{"b": 1, "a": [2]}')
    (tmp_path / "packed.json.gz").write_bytes(gzip.compress(b'{"z": {"y": null}}'))
    (tmp_path / "both.json").write_text('{"from": "json"}')
    (tmp_path / "both.json.gz").write_bytes(gzip.compress(b'{"from": "gz"}'))
    loader = PlainJSON()
    assert list(loader.load_file(str(tmp_path / "plain")).items()) == [("b", 1), ("a", [2])]
    assert loader.load_file(str(tmp_path / "packed")) == {"z": {"y": None}}
    assert loader.load_file(str(tmp_path / "both")) == {"from": "json"}
    assert loader.load_file(str(tmp_path / "missing")) is None
    assert loader.exists(str(tmp_path / "packed")) and not loader.exists(str(tmp_path / "missing"))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    assert S3Loader.create(os.environ["AWS_DATA_PATH"]).load_data("packed") == {"z": {"y": None}}
