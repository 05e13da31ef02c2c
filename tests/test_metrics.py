"""The Prometheus exporter, scraped over HTTP, over a real daemon's status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import write_manifest
from prometheus_client.parser import text_string_to_metric_families

from s3cache import resolve
from s3cache.errors import ConfigError, FetchFailed
from s3cache.service.metrics import FetchHistogram, parse_addr, serve_metrics
from s3cache.testing import FAKE_CREDENTIALS, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "s3cache.json"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(fetch(url)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_follow_a_real_daemon(tmp_path, s3, bucket, daemons):
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x" * 1000)
    d = daemons(args=["--max-size", "1500", "--lease", "0"])
    calls = []

    def snapshot():
        calls.append(1)
        return d.status()

    server = serve_metrics("127.0.0.1:0", snapshot)
    try:
        m = scrape(server.url)
        assert len(calls) == 1, "one status snapshot per scrape"
        assert m[("s3cache_fetched_objects_total", ())] == 0
        assert m[("s3cache_objects", (("state", "ready"),))] == 0
        assert m[("s3cache_cache_max_bytes", ())] == 1500
        assert m[("s3cache_build_info", (("version", "0.1.0"),))] == 1
        assert m[("s3cache_process_resident_memory_bytes", ())] > 0

        resolve(f"s3://{bucket}/a", cache_dir=d.cache_dir, timeout=120)
        # The file can be visible a moment before the daemon has counted it.
        d.wait_until(lambda st: st["fetched"] == 1 and st["wait_seconds"] > 0, what="a's fetch to be counted")
        m = scrape(server.url)
        assert m[("s3cache_fetched_objects_total", ())] == 1
        assert m[("s3cache_fetched_bytes_total", ())] == 1000
        assert m[("s3cache_objects", (("state", "ready"),))] == 1
        assert m[("s3cache_cache_used_bytes", ())] == 1000
        assert m[("s3cache_reader_misses_total", ())] == 1
        assert m[("s3cache_s3_requests_total", ())] >= 1
        assert m[("s3cache_reader_wait_seconds_total", ())] > 0

        resolve(f"s3://{bucket}/a", cache_dir=d.cache_dir, timeout=120)
        d.wait_until(lambda st: st["hits"] == 1, what="the hit to be noted")
        assert scrape(server.url)[("s3cache_reader_hits_total", ())] == 1

        # b does not fit beside a (max 1500 bytes): a, no longer leased, is evicted.
        resolve(f"s3://{bucket}/b", cache_dir=d.cache_dir, timeout=120)
        d.wait_until(lambda st: st["fetched"] == 2, what="b's fetch to be counted")
        m = scrape(server.url)
        assert m[("s3cache_evicted_objects_total", ())] == 1
        assert m[("s3cache_evicted_bytes_total", ())] == 1000

        with pytest.raises(FetchFailed):
            resolve(f"s3://{bucket}/missing", cache_dir=d.cache_dir, timeout=120)
        m = scrape(server.url)
        assert m[("s3cache_failed_objects", (("code", "NoSuchKey"),))] == 1
        assert m[("s3cache_objects", (("state", "failed"),))] == 1
        assert m[("s3cache_fetch_failures_total", ())] == 1
        assert m[("s3cache_disk_full", ())] == 0
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=5)


def test_fetch_histogram_is_served_with_cumulative_buckets():
    h = FetchHistogram()
    st = {"uptime": 1.0, "manifest_entries": 0, "objects": {"queued": 0, "fetching": 0, "ready": 0, "failed": 0},
          "fetched": 0, "fetched_bytes": 0, "failures_total": 0, "failures": [], "requests": 0, "retries": 0,
          "bytes": {"ready": 0, "reserved": 0, "max": 1, "free_fraction": 0.5}, "pinned": {"files": 0, "bytes": 0},
          "evicted": 0, "evicted_bytes": 0, "disk_full": False, "prefetch_paused": False, "readers": 0,
          "hits": 0, "misses": 0, "wait_seconds": 0.0}
    server = serve_metrics("127.0.0.1:0", lambda: st, h)
    try:
        assert scrape(server.url)[("s3cache_fetch_duration_seconds_count", ())] == 0
        h.record_fetch(0.2, 1000)
        h.record_fetch(3.0, 5 << 20)
        h.record_fetch(1000.0, 1)
        m = scrape(server.url)
    finally:
        server.stop()
    assert m[("s3cache_fetch_duration_seconds_count", ())] == 3
    assert m[("s3cache_fetch_duration_seconds_sum", ())] == pytest.approx(1003.2)
    assert m[("s3cache_fetch_duration_seconds_bucket", (("le", "0.1"),))] == 0
    assert m[("s3cache_fetch_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert m[("s3cache_fetch_duration_seconds_bucket", (("le", "5.0"),))] == 2
    assert m[("s3cache_fetch_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert m[("s3cache_fetch_size_bytes_bucket", (("le", "4096.0"),))] == 2
    assert m[("s3cache_fetch_size_bytes_sum", ())] == 1001 + (5 << 20)
    with pytest.raises(ValueError):
        h.record_fetch(-1, 0)


def test_metrics_address_is_loopback_unless_allowed():
    assert parse_addr("127.0.0.1:9109") == ("127.0.0.1", 9109)
    assert parse_addr(":9109") == ("127.0.0.1", 9109)
    assert parse_addr("localhost:9109") == ("127.0.0.1", 9109)
    assert parse_addr("[::1]:9109") == ("::1", 9109)
    with pytest.raises(ConfigError, match="not loopback"):
        parse_addr("0.0.0.0:9109")
    assert parse_addr("0.0.0.0:9109", allow_remote=True) == ("0.0.0.0", 9109)
    for bad in ("9109", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "metrics.example.com:9109"):
        with pytest.raises(ConfigError, match=re.escape(repr(bad))):
            parse_addr(bad)
    with pytest.raises(ConfigError, match="not loopback"):
        serve_metrics("10.1.2.3:9109", dict)


def test_port_in_use_is_a_clear_error():
    first = serve_metrics("127.0.0.1:0", dict)
    try:
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{first.port}"):
            serve_metrics(f"127.0.0.1:{first.port}", dict)
    finally:
        first()


def test_grafana_dashboard_uses_only_exported_metrics(daemons):
    """Every s3cache_* name in a panel query is one the exporter emits (so no panel is silently empty)."""
    d = daemons()
    server = serve_metrics("127.0.0.1:0", d.status, FetchHistogram())
    try:
        emitted = set()
        for fam in text_string_to_metric_families(fetch(server.url)):
            emitted.add(fam.name)  # a family with no sample yet (no failures) is still exported
            emitted.update(s.name for s in fam.samples)
    finally:
        server.stop()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {n for e in exprs for n in re.findall(r"\bs3cache_[a-z0-9_]+", e)}
    assert used and used <= emitted, used - emitted
    # and the families the issue asks for are on the dashboard
    for name in ("s3cache_fetched_bytes_total", "s3cache_fetched_objects_total", "s3cache_objects",
                 "s3cache_cache_used_bytes", "s3cache_cache_max_bytes", "s3cache_evicted_bytes_total",
                 "s3cache_reader_hits_total", "s3cache_reader_misses_total", "s3cache_reader_wait_seconds_total",
                 "s3cache_fetch_duration_seconds_bucket", "s3cache_s3_retries_total", "s3cache_s3_requests_total",
                 "s3cache_disk_full", "s3cache_failed_objects"):
        assert name in used, name


def housekeeping_went_round(d, uris: list[str]) -> None:
    """Wait until the daemon's housekeeping has gone once all round its steps (so that ``loop_errors``
    would show a step that raises): a reader's use of ``uris[0]`` reaches the index at the first step
    of some round; the use of ``uris[1]``, made after that, can only reach it at a later round's, which
    comes after every step of the first."""
    from s3cache.store.files import Layout
    from s3cache.store.index import Index

    index = Index(Layout(str(d.cache_dir.absolute())).index)
    try:
        for uri in uris[:2]:
            before = index.get(uri).last_used
            resolve(uri, cache_dir=d.cache_dir, timeout=60)
            wait_for(lambda u=uri, b=before: index.get(u).last_used != b, 60, f"{uri}'s use in the index")
    finally:
        index.close()


def test_serve_exports_metrics_on_metrics_addr(tmp_path, s3, bucket, daemons):
    """The real serve: the fetch histogram, errors by code and the manifest's bytes move with the work."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"12345")
    s3.put_object(Bucket=bucket, Key="sized", Body=b"x" * 7000)
    port = free_port()
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/k", f"s3://{bucket}/sized size=7000",
                                                             f"s3://{bucket}/gone"]),
                args=["--metrics-addr", f"127.0.0.1:{port}"])
    d.wait_until(lambda st: st["fetched"] == 2 and st["objects"]["failed"] == 1)
    m = scrape(f"http://127.0.0.1:{port}/metrics")
    assert m[("s3cache_fetched_bytes_total", ())] == 7005 and m[("s3cache_manifest_entries", ())] == 3
    # each fetch recorded once, by the workers: count, sum of sizes, and the bucket a 5-byte object falls in
    assert m[("s3cache_fetch_duration_seconds_count", ())] == 2
    assert m[("s3cache_fetch_duration_seconds_sum", ())] > 0
    assert m[("s3cache_fetch_size_bytes_count", ())] == 2 and m[("s3cache_fetch_size_bytes_sum", ())] == 7005
    assert m[("s3cache_fetch_size_bytes_bucket", (("le", "4096.0"),))] == 1
    assert m[("s3cache_fetch_errors_total", (("code", "NoSuchKey"),))] == 1
    # the manifest's size plus the one learned from S3; "gone" never told its size
    assert m[("s3cache_manifest_bytes", ())] == 7005
    assert m[("s3cache_disk_full_pauses_total", ())] == 0
    housekeeping_went_round(d, [f"s3://{bucket}/k", f"s3://{bucket}/sized"])
    st = d.status()
    assert st["manifest_bytes"] == {"total": 7005, "ready": 7005, "unknown_sizes": 1}
    assert st["errors_by_code"] == {"NoSuchKey": 1} and st["loop_errors"] == {}
    d.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_serve_refuses_a_remote_metrics_addr_unless_allowed(tmp_path, moto):
    env = {**os.environ, **FAKE_CREDENTIALS}
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(tmp_path / "c"),
                        "--endpoint-url", moto.url, "--metrics-addr", "0.0.0.0:9109"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "is not loopback" in r.stderr and "--metrics-allow-remote" in r.stderr


def test_the_daemon_does_not_load_prometheus_client_without_metrics_addr():
    """FetchHistogram is recorded always, the exporter loaded only for --metrics-addr."""
    code = ("import sys, s3cache.daemon.root, s3cache.cli; d = s3cache.daemon.root.Daemon; "
            "assert 'prometheus_client' not in sys.modules, 'loaded'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
