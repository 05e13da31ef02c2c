"""A peer is never trusted: wrong bytes from it are not published and the object comes from S3; an
owner killed mid-transfer costs the other hosts only a fetch from S3."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.fleet import Fleet, upload
from s3cache import resolve
from s3cache.peer.owners import RendezvousOwners


def _each_host_owns(fleet: Fleet, per_host: int) -> Callable[[str], bool]:
    """A ``keep`` for ``upload`` that takes ``per_host`` objects owned by each host of ``fleet``."""
    owners, counts = RendezvousOwners(fleet.addrs), Counter()

    def keep(uri: str) -> bool:
        owner = owners.owner(uri)
        counts[owner] += 1
        return counts[owner] <= per_host

    return keep


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_peer_serving_flipped_bytes_is_marked_out_and_the_object_comes_from_s3(tmp_path, s3, bucket, proxy):
    fleet = Fleet(tmp_path / "fleet", proxy.url, 2, args=["--workers", "2"])
    data, lines = upload(s3, bucket, 6, 32 << 10, keep=_each_host_owns(fleet, 3))
    a, b = fleet.daemons
    owners = RendezvousOwners(fleet.addrs)
    bad = next(u for u in data if owners.owner(u) == fleet.addrs[0])
    try:
        fleet.start([0])  # host 1 is down: host 0 fetches everything itself
        fleet.job(lines)
        a.wait_until(lambda st: st["objects"]["ready"] == len(data), 120, "host 0 holding everything")
        _flip(resolve(bad, cache_dir=a.cache_dir))  # host 0's disk (or host 0) now lies
        gets_before = proxy.gets(f"/{bucket}/")
        fleet.start([1])
        st = b.wait_until(lambda st: st["objects"]["ready"] == len(data), 120, "host 1 holding everything")
        for uri, body in data.items():
            assert Path(resolve(uri, cache_dir=b.cache_dir)).read_bytes() == body
        peers = st["peers"]
    finally:
        codes = fleet.stop()
    assert peers["peer_failures"].get("bad-bytes") == 1, peers
    assert peers["out"][fleet.addrs[0]]["why"] == "bad-bytes"
    assert peers["errors"][fleet.addrs[0]] == {"bad-bytes": 1}
    # The flipped object came from S3 a second time (host 0's fetch, then host 1's), and no failure
    # was recorded against it: a peer's bad bytes are not the object's.
    assert proxy.gets("/" + bad.removeprefix("s3://")) == 2
    assert proxy.gets(f"/{bucket}/") > gets_before
    assert st["objects"]["failed"] == 0 and not st["errors_by_code"], st["errors_by_code"]
    assert codes == [0, 0]
    assert not fleet.log_problems()


def test_an_owner_killed_mid_transfer_leaves_the_others_to_finish_from_s3(tmp_path, s3, bucket, proxy):
    # Host 0 serves slowly (a 128 KiB/s peer link), so that its transfers are in flight when it dies.
    fleet = Fleet(tmp_path / "fleet", proxy.url, 2, args=["--workers", "2"], peer_rate=128 << 10)
    data, lines = upload(s3, bucket, 6, 512 << 10, keep=_each_host_owns(fleet, 3))
    a, b = fleet.daemons
    try:
        fleet.start([0])
        fleet.job(lines)
        a.wait_until(lambda st: st["objects"]["ready"] == len(data), 120, "host 0 holding everything")
        fleet.start([1])
        a.wait_until(lambda st: st["peers"]["connections"] > 0, 120, "host 1 fetching from host 0")
        a.kill()  # SIGKILL, mid-transfer
        paths = resolve(list(data), cache_dir=b.cache_dir, timeout=120)
        for uri, p in zip(data, paths):
            assert Path(p).read_bytes() == data[uri]
        st = b.status()
    finally:
        codes = fleet.stop()
    peers = st["peers"]
    assert {"reset", "short"} & set(peers["peer_failures"]), peers  # a transfer was cut by the kill
    assert peers["out"][fleet.addrs[0]]["why"] in ("reset", "short"), peers
    assert sum(peers["errors"][fleet.addrs[0]].values()) >= 1
    assert st["objects"]["failed"] == 0
    assert codes[1] == 0
    assert not fleet.log_problems()


def test_a_peer_slower_than_s3_is_given_up_and_marked_out(tmp_path, s3, bucket, proxy):
    # Host 0 serves at 16 KiB/s (a minute a file) and never goes idle; host 1 waits on it no longer
    # than its --peer-timeout (1 s) plus twice what S3 takes for the size.
    fleet = Fleet(tmp_path / "fleet", proxy.url, 2, args=["--workers", "2"], peer_timeout=1.0,
                  peer_rate=16 << 10)
    data, lines = upload(s3, bucket, 4, 1 << 20, keep=_each_host_owns(fleet, 2))
    a, b = fleet.daemons
    try:
        fleet.start([0])
        fleet.job(lines)
        a.wait_until(lambda st: st["objects"]["ready"] == len(data), 120, "host 0 holding everything")
        fleet.start([1])
        paths = resolve(list(data), cache_dir=b.cache_dir, timeout=120)
        for uri, p in zip(data, paths):
            assert Path(p).read_bytes() == data[uri]
        st = b.status()
    finally:
        codes = fleet.stop()
    peers = st["peers"]
    assert set(peers["peer_failures"]) == {"slow"}, peers  # one per transfer in flight when it failed
    assert peers["out"][fleet.addrs[0]]["why"] == "slow"
    assert peers["from_peers"]["objects"] == 0 and peers["from_s3"]["objects"] == len(data)
    assert codes == [0, 0]
    assert not fleet.log_problems()
