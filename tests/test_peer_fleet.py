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
