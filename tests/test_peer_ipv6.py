"""``--peer-addr`` / ``--peers`` with IPv6 addresses: written in brackets, spelled any way, served over
IPv6. Before, a daemon given ``[::1]:PORT`` could not listen (its server bound IPv4 only), and
``[0:0::1]:PORT`` in one place and ``[::1]:PORT`` in the other did not find each other."""

from __future__ import annotations

import http.client
import os
import time

import pytest
from conftest import write_manifest

from s3cache.errors import ConfigError
from s3cache.peer import signing
from s3cache.peer.client import request_uri
from s3cache.peer.members import parse_list, resolve
from s3cache.service.config import peer_address
from s3cache.testing import free_port

SECRET = "s" * 32


def test_ipv6_peers_have_one_spelling_and_unbracketed_ones_are_refused_with_the_fix():
    assert peer_address("[0:0:0:0:0:0:0:1]:07480") == "[::1]:7480"
    assert peer_address(" [FD00:0::7]:7480 ") == "[fd00::7]:7480"
    assert peer_address("10.0.0.7:7480") == "10.0.0.7:7480"
    assert resolve("[fd00::7]:7480,[FD00::8]:7480", "[fd00:0::8]:7480") == ["[fd00::7]:7480", "[fd00::8]:7480"]
    with pytest.raises(ConfigError, match=r"--peers: not HOST:PORT: 'fd00::7:7480' \(an IPv6 address goes in brackets"):
        parse_list("fd00::7:7480")
    with pytest.raises(ConfigError, match=r"not an IPv6 address in brackets: '\[fd00::zz\]:7480'"):
        peer_address("[fd00::zz]:7480")
    with pytest.raises(ConfigError, match="is listed twice"):
        parse_list("[::1]:7480,[0::1]:7480")


def test_a_daemon_on_an_ipv6_peer_addr_serves_its_files_over_ipv6(tmp_path, s3, bucket, daemons):
    port = free_port()
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    os.chmod(secret, 0o600)
    body = os.urandom(4096)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    uri = f"s3://{bucket}/k"
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [uri]),
                args=["--peers", f"[::1]:{port}", "--peer-addr", f"[0:0::1]:{port}",
                      "--peer-secret-file", str(secret)])
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    assert d.status()["peers"]["me"] == f"[::1]:{port}"
    target = request_uri(uri, 1)
    conn = http.client.HTTPConnection("::1", port, timeout=30)
    try:
        conn.request("GET", target, headers=signing.sign(SECRET.encode(), "GET", target, time.time()))
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, body)
    finally:
        conn.close()
