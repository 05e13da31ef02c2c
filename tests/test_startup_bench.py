"""bench.startup is a command, not a timed test: one round of it, this tree against itself as the
baseline, proves that it starts both daemons, sees their first GET and their ready line, and reports."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_startup_bench_runs_one_round_against_a_baseline_tree(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.startup", "--runs", "1", "--top", "3", "--baseline-tree", str(ROOT)],
                       check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[1].startswith("this tree: exec to first GET median ") and "CPU-s to ready median" in lines[1]
    assert lines[2].startswith(f"baseline {ROOT}: exec to first GET median ")
    assert lines[3].startswith("this / baseline (medians): time to first GET ")
    assert "s3cache.daemon.root" in r.stdout  # the slowest imports, from -X importtime
