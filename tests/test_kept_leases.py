"""Leases across a restart: what was promised to a reader before the daemon
restarted is kept after it, each lease for what is left of it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import put_objects

from s3cache import resolve
from s3cache.policy.leases import Leases

MiB = 1 << 20


def test_leases_are_restored_in_order_for_what_is_left_of_them():
    before = Leases(lease=600, budget=10 * MiB)
    before.saw("p1", "s3://b/a", MiB, now=100.0)
    before.saw("p1", "s3://b/b", MiB, now=200.0)
    before.saw("p2", "s3://b/c", MiB, now=650.0)
    rows = before.snapshot(now=690.0)
    assert sorted(r[1] for r in rows) == ["s3://b/a", "s3://b/b", "s3://b/c"]
    assert before.snapshot(now=705.0) == [r for r in rows if r[1] != "s3://b/a"]  # a's 600 s ended at 700
    after = Leases(lease=600, budget=10 * MiB)
    future = ["p3", "s3://b/d", MiB, 900.0, 9]  # a time on another clock: dropped, as are malformed rows
    assert after.restore(rows + [["bad"], future, ["p3", "s3://b/d", "1", 650.0, 9]], now=695.0) == 3
    assert after.held(now=695.0) == {"s3://b/a", "s3://b/b", "s3://b/c"}
    assert after.held(now=705.0) == {"s3://b/b", "s3://b/c"}
    after.saw("p1", "s3://b/e", MiB, now=760.0)  # a new lease comes after the restored ones in p1's order
    p1 = [r[4] for r in after.snapshot(now=760.0) if r[0] == "p1"]
    assert p1 == sorted(p1)
    assert max(r[4] for r in after.snapshot(now=760.0)) == next(r[4] for r in after.snapshot(now=760.0) if r[1] == "s3://b/e")
    assert after.restore("not rows", now=0.0) == 0 and Leases(600, MiB).restore(None, now=0.0) == 0

READER_B = """
import sys
from s3cache import resolve
for uri in sys.argv[2:]:
    with open(resolve(uri, cache_dir=sys.argv[1], timeout=60), "rb") as f:
        f.read()
"""


def test_a_restart_keeps_the_lease_of_a_file_a_reader_was_given(tmp_path, s3, bucket, daemons):
    """Reader A resolves F1 under --lease 600; the daemon restarts; reader B (another process) reads
    five files through a 4 MiB cache. F1, the least recently used file, is the first victim unless
    its lease survived the restart."""
    data = put_objects(s3, bucket, "f", 6, MiB)
    uris = list(data)
    cache = tmp_path / "cache"
    args = ["--max-size", "4M", "--lease", "600", "--min-free", "0"]
    first = daemons(cache, args=args)
    f1 = resolve(uris[0], cache_dir=cache, timeout=60)
    assert first.stop() == 0
    daemons(cache, args=args)
    r = subprocess.run([sys.executable, "-c", READER_B, str(cache), *uris[1:]], capture_output=True, text=True,
                       timeout=300, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    with open(f1, "rb") as f:  # reader A opens the file it was given before the restart
        assert f.read() == data[uris[0]]
