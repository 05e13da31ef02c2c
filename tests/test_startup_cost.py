"""What start-up skips or overlaps to reach its first GET sooner (docs/benchmarks.md, start-up), and that
doing so changes nothing else: the S3 client's loader reads S3's data alone; the peer tier is not loaded
unasked; the index opened beside the manifest's reading is closed when that reading fails."""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import botocore.loaders
import pytest
from conftest import write_manifest

from s3cache.daemon.root import Daemon
from s3cache.errors import ManifestError
from s3cache.fetch.s3api import make_client
from s3cache.fetch.s3loader import S3Loader, s3_endpoints
from s3cache.service.config import Settings
from s3cache.testing import DaemonProcess, wait_for

# Runs ``s3cache serve`` (argv) in this process, and prints the peer modules loaded once the daemon
# answers hello: seen from inside the real serve.
_REPORT_ONCE_SERVING = """
import sys, threading
from s3cache.cli import main
from s3cache.errors import DaemonNotRunning
from s3cache.sockets.control import Client
from s3cache.store.layout import Layout
from s3cache.testing import wait_for

def report():
    cache = sys.argv[sys.argv.index("--cache-dir") + 1]
    def serving():
        try:
            with Client(Layout(cache).control_socket, cache, timeout=5) as c:
                return bool(c.request({"op": "hello"}).get("ok"))
        except (DaemonNotRunning, OSError):
            return False
    wait_for(serving, 60, "serving")
    peer = sorted(m for m in sys.modules if m.startswith(("s3cache.peer", "s3cache.daemon.peering")))
    print(f"serving: peer={peer}", flush=True)

threading.Thread(target=report, daemon=True).start()
sys.argv[0] = "s3cache"
main()
"""


def test_the_s3_client_loader_looks_at_s3_alone(tmp_path, monkeypatch, moto, s3, bucket):
    """botocore's loader lists every service it has data for to check that one exists (~400 directories,
    per kind of model: ~10 ms of a start); ours answers from S3's directory, and still reads AWS_DATA_PATH."""
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    client = make_client(moto.url, "us-east-1", pool=2, connect_timeout=5, read_timeout=5)
    loader = client._loader  # the session's data loader, which the client was built with
    assert loader.list_available_services("service-2") == ["s3"]
    assert loader.list_available_services("endpoint-rule-set-1") == ["s3"]
    assert loader.list_available_services("no-such-model-1") == []
    assert str(tmp_path) in loader.search_paths
    s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"hello"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]


def test_the_s3_parts_of_endpoints_are_what_botocore_reads(tmp_path, monkeypatch):
    """Each partition's head and S3 entry, decoded from their place in the file, equal (in order too)
    botocore's whole endpoints.json cut to S3; a file laid out otherwise is decoded whole, and an
    endpoints.json on AWS_DATA_PATH wins as with botocore's loader."""
    builtin = botocore.loaders.Loader()
    full, path = builtin.load_data_with_path("endpoints")
    text = Path(path + ".json").read_text(encoding="utf-8")
    for partition in full["partitions"]:
        partition["services"] = OrderedDict(s3=partition["services"]["s3"])
    assert json.dumps(s3_endpoints(text)) == json.dumps(full)
    assert S3Loader().load_data_with_path("endpoints") == (full, path)
    assert s3_endpoints(json.dumps(json.loads(text), indent=2)) is None  # another pretty printer
    assert s3_endpoints(text.replace('"s3" : {', '"s4" : {')) is None  # a partition without S3
    after = text.replace("\n    }\n  }, {\n", '\n    },\n    "zzz" : 1\n  }, {\n', 1)  # a key after services
    assert after != text and s3_endpoints(after) is None
    mine = {"partitions": [{"partition": "test", "regions": {}, "services": {"s3": {}, "ec2": {}}}], "version": 3}
    (tmp_path / "endpoints.json").write_text(json.dumps(mine))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    loaded, where = S3Loader.create(os.environ["AWS_DATA_PATH"]).load_data_with_path("endpoints")
    assert (loaded, where) == (mine, str(tmp_path / "endpoints"))


def test_a_daemon_without_peers_never_loads_the_peer_tier(tmp_path, moto, s3, bucket):
    """The peer tier (an HTTP server, signing, membership) loads only with --peers: a daemon without it
    serves, fetches and stops as ever without having imported it."""
    line = serving_report(tmp_path, moto, s3, bucket, _REPORT_ONCE_SERVING, "serving: peer")
    assert line == "serving: peer=[]", line


def serving_report(tmp_path, moto, s3, bucket, script: str, prefix: str) -> str:
    """Run ``serve`` (its own arguments, a one-object manifest) under ``script``, which prints a line
    starting with ``prefix`` once the daemon answers; return that line, once the object is fetched and
    the daemon stopped cleanly."""
    s3.put_object(Bucket=bucket, Key="a.bin", Body=b"a" * 1000)
    manifest = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a.bin"])
    d = DaemonProcess(tmp_path / "cache", moto.url, manifest=manifest)
    d.cmd = [sys.executable, "-c", script, *d.cmd[3:]]  # serve's own arguments
    try:
        d.start()
        line = wait_for(lambda: next((x for x in d.log().splitlines() if x.startswith(prefix)), None),
                        60, f"{prefix!r} once serving")
        d.wait_until(lambda st: st["objects"]["ready"] == 1, 60, "a.bin fetched")
    finally:
        assert d.stop() == 0, d.log()
    return line


def test_a_start_refused_while_the_index_opened_closes_it(tmp_path, moto):
    """The index opens on a thread of its own while the manifest is read: a manifest refused meanwhile
    stops the start with the manifest's error, the opened index handed to teardown (which closes it),
    no thread left behind (the autouse fixture checks), and the cache dir free for the next daemon."""
    bad = tmp_path / "m.txt"
    bad.write_text("s3://bucket/ok.bin\nnot a uri\n")
    settings = Settings(cache_dir=tmp_path / "cache", manifest=bad, endpoint_url=moto.url, max_size=1 << 30,
                        min_free=0.0)
    d = Daemon(settings)
    with pytest.raises(ManifestError, match=r"m\.txt:2: "):
        d.start()
    assert d.index is not None  # opened meanwhile, and closed by teardown
    again = Daemon(Settings(cache_dir=tmp_path / "cache", endpoint_url=moto.url, max_size=1 << 30, min_free=0.0))
    again.start()
    again.stop()
    again.wait()
