"""The fleet benchmark is a command, not a timed test: its smoke mode proves it runs and that peers
bring the fleet's S3 GETs to one per object."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fleet_benchmark_runs_in_smoke_mode():
    r = subprocess.run([sys.executable, "-m", "bench.fleet", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = dict(re.findall(r"^\| (alone|peers) \| (\d+) \|", r.stdout, re.MULTILINE))
    assert rows == {"alone": "16", "peers": "8"}, r.stdout  # 2 hosts, 8 objects
