"""The peer listener refuses what is not a signed request for an object of its manifest, and a
neighbour cannot exhaust it: connections are capped and idle ones closed."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

import pytest

from bench.fleet import SECRET, Fleet, upload
from s3cache.peer import signing
from s3cache.peer.client import request_uri
from s3cache.peer.server import Found, PeerServer
from s3cache.testing import free_port, wait_for


def _get(port: int, target: str, *, secret: bytes | None = SECRET.encode(), when: float | None = None,
         method: str = "GET", sign_as: str | None = None) -> tuple[int, bytes]:
    headers = {}
    if secret is not None:
        headers = signing.sign(secret, method, sign_as or target, time.time() if when is None else when)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path, s3, bucket, proxy):
    """One host (its own owner) holding two objects of its manifest; a third object is in S3 only."""
    data, lines = upload(s3, bucket, 2, 4096)
    s3.put_object(Bucket=bucket, Key="secret/other", Body=b"not in the manifest")
    fleet = Fleet(tmp_path / "fleet", proxy.url, 1)
    try:
        fleet.start()
        fleet.job(lines)
        fleet.wait_all_ready(len(data))
        yield fleet, data
    finally:
        assert fleet.stop() == [0]
        assert not fleet.log_problems()


def test_a_signed_request_for_a_manifest_object_is_served(served):
    fleet, data = served
    uri, body = next(iter(data.items()))
    assert _get(fleet.ports[0], request_uri(uri, 1)) == (200, body)


def test_unsigned_wrongly_signed_stale_or_altered_requests_are_refused(served):
    fleet, data = served
    port, target = fleet.ports[0], request_uri(next(iter(data)), 1)
    assert _get(port, target, secret=None)[0] == 403
    assert _get(port, target, secret=b"a-different-secret-of-some-length")[0] == 403
    assert _get(port, target, when=time.time() - 3600)[0] == 403
    other = request_uri(list(data)[1], 1)
    assert _get(port, other, sign_as=target)[0] == 403  # a signature for another object
    st = fleet.daemons[0].status()["peers"]
    assert st["refused"] == {"unsigned": 1, "bad signature": 2, "stale": 1}
    assert st["served"]["objects"] == 0


def test_an_object_outside_the_manifest_is_refused_without_asking_s3(served, bucket, proxy):
    fleet, _ = served
    before = proxy.total()
    assert _get(fleet.ports[0], request_uri(f"s3://{bucket}/secret/other", 5))[0] == 404
    assert proxy.total() == before


def test_paths_are_never_served(served, bucket):
    fleet, data = served
    port = fleet.ports[0]
    rel = next(p for p in fleet.cache_dirs[0].rglob("*") if p.is_file() and p.read_bytes() in data.values())
    for uri in ["/etc/passwd", f"s3://{bucket}/../../../etc/passwd", str(rel),
                str(rel.relative_to(fleet.cache_dirs[0])), f"s3://{bucket}/fleet/../fleet/00000"]:
        assert _get(port, request_uri(uri, 0))[0] in (400, 404), uri
    for target in ["/etc/passwd", "/v1/object/../../etc/passwd", "/v1/../etc/passwd?uri=x", str(rel)]:
        assert _get(port, target)[0] == 400, target
    assert _get(port, request_uri(next(iter(data)), 0), method="PUT")[0] == 405
    assert fleet.daemons[0].status()["peers"]["served"]["objects"] == 0


def test_connections_are_capped_and_idle_ones_closed(tmp_path):
    f = tmp_path / "obj"
    f.write_bytes(b"x" * 1000)
    secret = SECRET.encode()
    server = PeerServer(f"127.0.0.1:{free_port()}", secret, lambda uri, wait: Found(str(f)),
                        max_connections=2, idle=0.5)
    server.start()
    port = server.address[1]
    held = []
    try:
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        wait_for(lambda: server.status()["connections"] == 2, 30, "two connections held")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
            assert third.recv(1) == b""  # closed at once: the cap
        assert server.status()["refused"] == {"too many connections": 1}
        for s in held:  # a neighbour that sends nothing is closed after the idle timeout
            assert s.recv(1) == b""
        wait_for(lambda: server.status()["connections"] == 0, 30, "idle connections closed")
        assert _get(port, request_uri("s3://b/k", 0)) == (200, b"x" * 1000)
    finally:
        for s in held:
            s.close()
        server.stop()


def test_peer_figures_are_in_status_and_metrics(served):
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from s3cache.service.metrics import StatusCollector

    fleet, data = served
    uri, body = next(iter(data.items()))
    assert _get(fleet.ports[0], request_uri(uri, 1)) == (200, body)
    # The server counts an object once its last byte is sent, which the reader may see first.
    st = fleet.daemons[0].wait_until(lambda st: st["peers"]["served"]["objects"] >= 1, 60, "the send counted")
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: st))
    text = generate_latest(registry).decode()
    assert f's3cache_source_objects_total{{source="s3"}} {float(len(data))}' in text
    assert "s3cache_peer_served_objects_total 1.0" in text
    assert f"s3cache_peer_served_bytes_total {float(len(body))}" in text
    assert "s3cache_peers_out 0.0" in text


def test_an_owner_fetches_an_object_it_lacks_once_for_concurrent_asks_and_notes_no_reader(served, proxy):
    import threading

    from s3cache import resolve

    fleet, data = served
    uri, body = next(iter(data.items()))
    Path(resolve(uri, cache_dir=fleet.cache_dirs[0])).unlink()  # gone behind the daemon's back
    key_path = "/" + uri.removeprefix("s3://")
    # That resolve's usage note reaches the daemon on its own time (use.sock): wait until it counts, so
    # that the counts below compare the peers' asks alone.
    before, st0 = proxy.gets(key_path), fleet.daemons[0].wait_until(lambda st: st["readers"] >= 1, 60,
                                                                    "this test's resolve noted")
    answers: list = []
    asks = [threading.Thread(target=lambda: answers.append(_get(fleet.ports[0], request_uri(uri, 30))))
            for _ in range(3)]
    for t in asks:
        t.start()
    for t in asks:
        t.join()
    assert answers == [(200, body)] * 3
    assert proxy.gets(key_path) - before == 1  # fetched once from S3, however many asked
    st = fleet.daemons[0].status()
    assert st["misses"] == st0["misses"] and st["readers"] == st0["readers"]  # a peer is not a reader
    assert st["wait_seconds"] == st0["wait_seconds"]


def test_a_host_finds_its_fleet_in_dns(tmp_path, s3, bucket, proxy):
    """``--peers dns:NAME`` (a headless Service): here NAME is localhost, a fleet of this host alone."""
    data, lines = upload(s3, bucket, 2, 4096)
    fleet = Fleet(tmp_path / "fleet", proxy.url, 1, members="dns:localhost")
    try:
        fleet.start()
        fleet.job(lines)
        fleet.wait_all_ready(len(data))
        uri, body = next(iter(data.items()))
        assert _get(fleet.ports[0], request_uri(uri, 1)) == (200, body)
        st = fleet.daemons[0].status()["peers"]
    finally:
        codes = fleet.stop()
    assert st["hosts"] == 1 and st["me"] == fleet.addrs[0]
    assert codes == [0] and not fleet.log_problems()


@pytest.mark.parametrize("problem", ["port in use", "secret readable by all", "not in the list"])
def test_a_bad_peer_setting_stops_serve_with_exit_2_naming_it(tmp_path, problem):
    import os
    import subprocess
    import sys

    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    os.chmod(secret, 0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        me = f"127.0.0.1:{taken.getsockname()[1] if problem == 'port in use' else free_port()}"
        peers = me if problem != "not in the list" else "127.0.0.1:1"
        if problem == "secret readable by all":
            os.chmod(secret, 0o644)
        r = subprocess.run([sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(tmp_path / "c"),
                            "--endpoint-url", "http://127.0.0.1:9", "--peers", peers, "--peer-addr", me,
                            "--peer-secret-file", str(secret)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert {"port in use": "cannot listen there", "secret readable by all": "readable by every user",
            "not in the list": "is not in --peers"}[problem] in r.stderr, r.stderr
