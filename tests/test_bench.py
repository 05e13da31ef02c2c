"""The benchmark is a command, not a timed test: CI runs it in smoke mode only to prove that it works."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_comparison_benchmark_runs_in_smoke_mode():
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| s3cache: epoch 2 (warm, resolve) |" in r.stdout
    assert "S3 requests in warm epochs: 0" in r.stdout
    assert (ROOT / "bench" / "results" / "compare-smoke.md").exists()


def test_policy_simulator_runs():
    r = subprocess.run([sys.executable, "-m", "bench.simulate", "--files", "40", "--cache", "20"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| cyclic, dataset 2x cache (40 files, cache 20) | 0.000 |" in r.stdout
