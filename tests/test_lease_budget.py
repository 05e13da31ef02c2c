"""The lease budget on a filesystem smaller than --max-size: a share of what the
cache can really hold, so a reader's own old leased files never keep its next file out."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import put_objects

from s3cache import resolve
from s3cache.policy.leases import LEASE_SHARE, lease_budget

MiB = 1 << 20


def test_the_budget_is_a_share_of_the_smaller_of_max_size_and_the_filesystem():
    assert lease_budget(100 * MiB, 8 * MiB) == 8 * MiB // LEASE_SHARE
    assert lease_budget(8 * MiB, 100 * MiB) == 8 * MiB // LEASE_SHARE


def test_a_reader_is_not_held_up_by_its_own_leases_on_a_filesystem_smaller_than_max_size(small_fs, s3, bucket,
                                                                                          daemons):
    """An 8 MiB filesystem under --max-size 100M, --lease 600. The reader reads five 1 MiB files, then
    wants a 5 MiB one: the filesystem has room for it once its three oldest files go. A budget of
    100M/32 leased three of its five (its newest two, and one more within 3.1 MiB), so only two could
    go and the reader waited the whole lease; 8M/32 leases the newest two only."""
    fs = small_fs("8m")
    cache = fs / "cache"
    small = put_objects(s3, bucket, "small", 5, MiB)
    big = os.urandom(5 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=big)
    daemons(cache, args=["--max-size", "100M", "--lease", "600", "--min-free", "0"])
    for uri, body in small.items():
        with open(resolve(uri, cache_dir=cache, timeout=60), "rb") as f:  # read, as a reader does
            assert f.read() == body
    path = resolve(f"s3://{bucket}/big", cache_dir=cache, timeout=60)
    assert Path(path).read_bytes() == big
