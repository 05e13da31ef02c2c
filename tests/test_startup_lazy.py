"""What ``s3cache serve`` never imports on its way to serving (docs/benchmarks.md, start-up): the readers'
resolve code (the package root exports it lazily), and the TOML parser and difflib when no configuration
file is read. Each is checked inside a real ``serve`` once it answers, with the cyclic GC, paused while
the daemon's modules load, running again and those modules frozen out of it; and the package's public
names still work for the readers who use them."""

from __future__ import annotations

import subprocess
import sys

from conftest import write_manifest

from s3cache.testing import DaemonProcess, wait_for

# Modules the daemon must not have loaded once serving (without --config and with no default file).
UNUSED = ("s3cache.reader.resolve", "s3cache.reader.workers", "tomllib", "difflib")

# Runs ``s3cache serve`` (argv) in this process and, once the daemon answers hello, prints which of
# UNUSED it has loaded: seen from inside the real serve, through imports of its own only.
_REPORT_ONCE_SERVING = """
import gc, sys, threading, time
from s3cache.cli import main

UNUSED = %r

def report():
    from s3cache.errors import S3CacheError
    from s3cache.sockets.control import Client
    from s3cache.store.layout import Layout
    cache = sys.argv[sys.argv.index("--cache-dir") + 1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with Client(Layout(cache).control_socket, cache, timeout=5) as c:
                if c.request({"op": "hello"}).get("ok"):
                    break
        except (S3CacheError, OSError):
            pass
        time.sleep(0.05)
    print(f"serving: loaded={sorted(m for m in UNUSED if m in sys.modules)} gc={gc.isenabled()} "
          f"frozen={gc.get_freeze_count() > 10000}", flush=True)

threading.Thread(target=report, daemon=True).start()
sys.argv[0] = "s3cache"
main()
""" % (UNUSED,)


def test_serve_loads_neither_the_readers_resolve_nor_the_toml_parser(tmp_path, moto, s3, bucket, monkeypatch):
    """The package root imported resolve (and with it the readers' code) for every ``s3cache.<x>``
    import, the daemon's included; config_sources imported tomllib and difflib for a file most starts
    do not have. A daemon serves and fetches as ever without any of them, its GC on again and the
    daemon's modules (tens of thousands of objects) frozen out of it."""
    monkeypatch.delenv("S3CACHE_CONFIG", raising=False)
    s3.put_object(Bucket=bucket, Key="a.bin", Body=b"a" * 1000)
    manifest = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a.bin"])
    d = DaemonProcess(tmp_path / "cache", moto.url, manifest=manifest)
    d.cmd = [sys.executable, "-c", _REPORT_ONCE_SERVING, *d.cmd[3:]]  # serve's own arguments
    try:
        d.start()
        line = wait_for(lambda: next((x for x in d.log().splitlines() if x.startswith("serving: loaded")), None),
                        60, "the modules loaded once serving")
        assert line == "serving: loaded=[] gc=True frozen=True", line
        d.wait_until(lambda st: st["objects"]["ready"] == 1, 60, "a.bin fetched")
    finally:
        assert d.stop() == 0, d.log()


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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
