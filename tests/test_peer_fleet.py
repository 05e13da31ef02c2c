"""Several daemons on 127.0.0.1 serve each other, in front of moto through the counting proxy: a job of
N readers reshuffling globally each epoch costs the fleet one S3 GET per object for the whole run."""

from __future__ import annotations

import pytest

from bench.fleet import Fleet, read_epochs, upload


@pytest.mark.parametrize("hosts", [2, 4])
def test_a_globally_shuffled_job_pulls_each_object_from_s3_once(tmp_path, s3, bucket, proxy, hosts):
    data, lines = upload(s3, bucket, 24, 64 << 10)
    fleet = Fleet(tmp_path / "fleet", proxy.url, hosts, args=["--workers", "4"])
    try:
        fleet.start()
        fleet.job(lines)
        read_epochs(fleet.cache_dirs, data, epochs=2)  # every byte each reader reads is checked
        fleet.wait_all_ready(len(data))  # what is prefetched beyond the readers counts for the run too
        gets = proxy.gets(f"/{bucket}/")
        sts = fleet.statuses()
    finally:
        codes = fleet.stop()
    assert gets == len(data), f"{gets} S3 GETs for {len(data)} objects"
    peers = [st["peers"] for st in sts]
    assert sum(p["from_s3"]["objects"] for p in peers) == len(data)
    assert sum(p["from_peers"]["objects"] for p in peers) == (hosts - 1) * len(data)
    assert sum(p["served"]["objects"] for p in peers) == (hosts - 1) * len(data)
    assert all(p["s3_heads_for_checks"] == 0 for p in peers)  # the manifest's sha256 checked them
    assert all(not p["out"] and not p["peer_failures"] for p in peers), peers
    assert all(st["objects"]["failed"] == 0 for st in sts)
    assert codes == [0] * hosts
    assert not fleet.log_problems()


def test_without_checksums_in_the_manifest_a_peer_copy_is_checked_against_s3s_with_one_head(
        tmp_path, s3, bucket, proxy):
    data, lines = upload(s3, bucket, 8, 16 << 10)
    bare = [line.split()[0] for line in lines]  # URIs alone: no size=, no sha256=
    fleet = Fleet(tmp_path / "fleet", proxy.url, 2, args=["--workers", "2"])
    try:
        fleet.start()
        fleet.job(bare)
        read_epochs(fleet.cache_dirs, data, epochs=1)
        fleet.wait_all_ready(len(data))
        sts = fleet.statuses()
    finally:
        codes = fleet.stop()
    heads = sum(n for (m, p), n in proxy.snapshot().items() if m == "HEAD" and p.startswith(f"/{bucket}/"))
    peers = [st["peers"] for st in sts]
    assert proxy.gets(f"/{bucket}/") == len(data)
    # Each copy from a peer was checked against S3's own checksum (here the ETag's MD5), learnt by one
    # HEAD: a request, but no second download.
    assert sum(p["from_peers"]["objects"] for p in peers) == len(data)
    assert sum(p["s3_heads_for_checks"] for p in peers) == len(data) == heads
    assert all(st["verified_by"] == {"etag-md5": len(data)} for st in sts), [st["verified_by"] for st in sts]
    assert codes == [0, 0]
    assert not fleet.log_problems()


def test_sharded_hosts_reshuffling_globally_still_pull_each_object_once(tmp_path, s3, bucket, proxy):
    """--shard i/N with peers: each host prefetches its share, and reads of other shares' objects (a
    global reshuffle) come from their owner, not from S3 again."""
    data, lines = upload(s3, bucket, 16, 32 << 10)
    fleet = Fleet(tmp_path / "fleet", proxy.url, 2, args=["--workers", "2"], sharded=True)
    try:
        fleet.start()
        fleet.job(lines)
        read_epochs(fleet.cache_dirs, data, epochs=2)
        gets = proxy.gets(f"/{bucket}/")
        sts = fleet.statuses()
    finally:
        codes = fleet.stop()
    assert gets == len(data), f"{gets} S3 GETs for {len(data)} objects"
    assert sum(st["peers"]["from_peers"]["objects"] for st in sts) > 0
    assert codes == [0, 0]
    assert not fleet.log_problems()
