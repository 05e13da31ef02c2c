"""The peer tier's pure parts: owners by rendezvous hashing, signing, membership and health."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from s3cache.errors import ConfigError
from s3cache.peer import signing
from s3cache.peer.members import OUT_FOR, Health, parse_list, resolve
from s3cache.peer.owners import RendezvousOwners

HOSTS = [f"10.0.0.{i}:7480" for i in range(1, 9)]
URIS = [f"s3://data/train/shard-{i:05d}.tfrecord" for i in range(20000)]


def test_every_host_computes_the_same_owner():
    a, b = RendezvousOwners(HOSTS), RendezvousOwners(list(HOSTS))
    assert [a.owner(u) for u in URIS[:2000]] == [b.owner(u) for u in URIS[:2000]]


def test_objects_spread_over_the_hosts():
    owners = RendezvousOwners(HOSTS)
    counts = Counter(owners.owner(u) for u in URIS)
    assert set(counts) == set(HOSTS)
    fair = len(URIS) / len(HOSTS)
    assert all(0.7 * fair < n < 1.3 * fair for n in counts.values()), counts


def test_a_host_leaving_moves_only_its_own_objects():
    before = RendezvousOwners(HOSTS)
    gone = HOSTS[3]
    after = RendezvousOwners([h for h in HOSTS if h != gone])
    moved = [u for u in URIS if before.owner(u) != after.owner(u)]
    assert moved and all(before.owner(u) == gone for u in moved)
    assert len(moved) == sum(1 for u in URIS if before.owner(u) == gone)


def test_a_host_joining_takes_objects_only_for_itself():
    before = RendezvousOwners(HOSTS)
    after = RendezvousOwners(HOSTS + ["10.0.0.99:7480"])
    moved = [u for u in URIS if before.owner(u) != after.owner(u)]
    assert moved and all(after.owner(u) == "10.0.0.99:7480" for u in moved)


def test_a_lookup_is_about_a_microsecond_with_a_thousand_hosts(capsys):
    owners = RendezvousOwners([f"10.{i // 250}.{i % 250}.1:7480" for i in range(1000)], slots=1024)
    started = time.perf_counter()
    for u in URIS:
        owners.owner(u)
    per = (time.perf_counter() - started) / len(URIS)
    with capsys.disabled():
        print(f"\nowner lookup with 1000 hosts: {per * 1e6:.2f} us")
    assert len(set(owners.table)) > 500  # the slots are spread, not a stuck table


# == signing ==========================================================================================

SECRET = b"0123456789abcdef-shared"
URI = "/v1/object?uri=s3%3A%2F%2Fb%2Fk&wait=2.0"


def test_a_signed_request_is_accepted():
    now = 1_700_000_000.0
    assert signing.check(SECRET, "GET", URI, signing.sign(SECRET, "GET", URI, now), now + 1) is None


@pytest.mark.parametrize("change", ["method", "uri", "time", "secret", "signature", "missing", "stale", "nan"])
def test_anything_else_is_refused(change):
    now = 1_700_000_000.0
    method, uri, secret = "GET", URI, SECRET
    headers = signing.sign(SECRET, "GET", URI, now)
    if change == "method":
        method = "PUT"
    elif change == "uri":
        uri = URI.replace("%2Fk", "%2Fother")
    elif change == "time":
        headers[signing.TIME_HEADER] = f"{now + 1:.3f}"
    elif change == "secret":
        headers = signing.sign(b"another-secret-of-the-same-size", "GET", URI, now)
    elif change == "signature":
        headers[signing.SIGNATURE_HEADER] = "0" * 64
    elif change == "missing":
        del headers[signing.SIGNATURE_HEADER]
    elif change == "stale":
        now += signing.SKEW + 1
    elif change == "nan":
        headers[signing.TIME_HEADER] = "nan"
    assert signing.check(secret, method, uri, headers, now) is not None


def test_the_secret_file_must_be_private_and_long_enough(tmp_path):
    f = tmp_path / "secret"
    f.write_text("  a-long-enough-secret-value \n")
    os.chmod(f, 0o600)
    assert signing.read_secret(f) == b"a-long-enough-secret-value"
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        signing.read_secret(f)
    f.write_text("short")
    os.chmod(f, 0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        signing.read_secret(f)
    with pytest.raises(ConfigError, match="secret-file"):
        signing.read_secret(tmp_path / "missing")


# == membership =======================================================================================

def test_a_list_keeps_its_order():
    assert parse_list("b:1, a:2,c:3") == ["b:1", "a:2", "c:3"]


@pytest.mark.parametrize("text,what", [("a:1,a:1", "listed twice"), ("a", "HOST:PORT"), ("a:0", "HOST:PORT"),
                                       ("a:99999", "HOST:PORT"), ("a:1,b c:2", "HOST:PORT")])
def test_a_bad_list_names_the_problem(text, what):
    with pytest.raises(ConfigError, match=what):
        parse_list(text)


def test_a_file_of_hosts_with_comments(tmp_path):
    f = tmp_path / "peers"
    f.write_text("# the fleet\n10.0.0.1:7480\n10.0.0.2:7480  # rack 2\n\n")
    assert resolve(str(f), "10.0.0.2:7480") == ["10.0.0.1:7480", "10.0.0.2:7480"]
    f.write_text("10.0.0.1:7480\nnot an address\n")
    with pytest.raises(ConfigError, match="line 2"):
        resolve(str(f), "10.0.0.1:7480")


def test_tf_config_gives_chief_then_workers_on_the_peer_port():
    tf = json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"], "chief": ["c:2222"]},
                     "task": {"type": "worker", "index": 1}})
    assert resolve("tf_config", "w1:7480", {"TF_CONFIG": tf}) == ["c:7480", "w0:7480", "w1:7480"]
    with pytest.raises(ConfigError, match="TF_CONFIG is not set"):
        resolve("tf_config", "w1:7480", {})


def test_this_host_must_be_in_the_list():
    with pytest.raises(ConfigError, match="not in --peers"):
        resolve("a:1,b:2", "c:3")


def test_a_failed_peer_is_out_for_a_while_then_longer_if_it_fails_again():
    h = Health(["a:1", "b:2"], "a:1")
    assert h.usable("b:2", 0.0)
    h.fail("b:2", "refused", 100.0)
    h.fail("b:2", "refused", 101.0)  # another transfer in flight failing: out already, not for longer
    assert not h.usable("b:2", 100.0 + OUT_FOR - 0.1)
    assert h.usable("b:2", 100.0 + OUT_FOR)
    h.fail("b:2", "bad-bytes", 100.0 + OUT_FOR + 1)  # soon after coming back: twice as long
    assert not h.usable("b:2", 100.0 + 3 * OUT_FOR)
    st = h.status(100.0 + OUT_FOR + 2)
    assert st["out"]["b:2"]["why"] == "bad-bytes" and st["healthy"] == []
    assert st["errors"] == {"b:2": {"refused": 2, "bad-bytes": 1}}
    later = 100.0 + 10 * OUT_FOR  # long after: a new failure starts from the short period again
    h.fail("b:2", "timeout", later)
    assert h.usable("b:2", later + OUT_FOR)


def test_dns_gives_the_sorted_addresses_with_the_peer_port_and_this_host():
    from s3cache.peer.members import from_dns

    assert resolve("dns:localhost", "127.0.0.1:7480") == ["127.0.0.1:7480"]
    assert from_dns("localhost", "10.9.9.9:7480") == ["10.9.9.9:7480", "127.0.0.1:7480"]  # not ready yet: added
    with pytest.raises(ConfigError, match="dns:no-such-host.invalid"):
        resolve("dns:no-such-host.invalid", "127.0.0.1:7480")


def test_dns_gives_ipv6_peers_in_the_one_spelling_of_peer_addr():
    """getaddrinfo writes an IPv4-mapped address dotted (``::ffff:127.0.0.1``); --peer-addr is parsed to
    ``[::ffff:7f00:1]:7480``: unnormalised, this host was listed twice and its DNS spelling never matched."""
    from s3cache.peer.members import from_dns

    assert resolve("dns:::ffff:127.0.0.1", "[::ffff:127.0.0.1]:7480") == ["[::ffff:7f00:1]:7480"]
    assert from_dns("0:0::1", "[0::1]:07480") == ["[::1]:7480"]
    assert from_dns("::1", "[::2]:7480") == ["[::1]:7480", "[::2]:7480"]


def test_membership_from_a_file_follows_its_edits_and_survives_a_bad_read(tmp_path):
    from s3cache.peer.members import Membership

    f = tmp_path / "peers"
    f.write_text("\n".join(HOSTS[:4]) + "\n")
    health = Health(HOSTS[:4], HOSTS[0])
    m = Membership(str(f), HOSTS[0], health)
    assert m.dynamic and m.hosts == HOSTS[:4]
    before = {u: m.owner(u) for u in URIS[:3000]}
    assert not m.refresh()  # unchanged
    f.write_text("\n".join(HOSTS[:5]) + "\n")  # a host joins
    assert m.refresh() and m.hosts == HOSTS[:5] and m.changes == 1
    moved = [u for u in before if m.owner(u) != before[u]]
    assert moved and all(m.owner(u) == HOSTS[4] for u in moved)
    assert HOSTS[4] in health.status(0.0)["healthy"]
    f.write_text("not an address\n")  # a bad edit keeps the fleet as it was
    assert not m.refresh() and m.hosts == HOSTS[:5]
    assert not Membership(",".join(HOSTS[:2]), HOSTS[0]).dynamic
