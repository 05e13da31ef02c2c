"""The benchmark is a command, not a timed test: CI runs it in smoke mode only to prove that it works."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` (bytecode caches aside) with its mtime and size."""
    out = {}
    for p in root.rglob("*"):
        if "__pycache__" in p.parts or ".venvs" in p.parts:
            continue
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


def test_comparison_benchmark_runs_in_smoke_mode_from_anywhere(tmp_path):
    """Run as ``python path/to/bench`` from an unrelated directory, with no PYTHONPATH: the table goes to
    --out and nothing in the source tree is written."""
    before = tree(ROOT / "bench")
    out = tmp_path / "figures" / "smoke.md"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(ROOT / "bench"), "--smoke", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| s3cache: epoch 2 (warm, resolve) |" in r.stdout
    assert "S3 requests in warm epochs: 0" in r.stdout
    # the file is this run's table (a fresh path, so it cannot be left over from an earlier run)
    assert out.read_text().strip() == r.stdout[r.stdout.index("Dataset:"):].strip()
    assert tree(ROOT / "bench") == before


def test_bench_help_names_the_program_and_every_default(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m bench ")
    flat = "".join(r.stdout.split())  # argparse wraps (and splits hyphenated words): compare without spaces
    from bench.compare import parser

    ap = parser()
    for action in ap._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        shown = f"(default: {action.default})" if action.default is not None else "default "
        assert shown in " ".join(ap._get_formatter()._expand_help(action).split()), action.option_strings
        assert "".join(action.help.split()) in flat  # and it is in what --help printed
    assert "bench/results/local/compare.md" in flat and "bench/results/compare.mdregenerates" in flat


def test_policy_simulator_runs():
    r = subprocess.run([sys.executable, "-m", "bench.simulate", "--files", "40", "--cache", "20"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| cyclic, dataset 2x cache (40 files, cache 20) | 0.000 |" in r.stdout
