"""The live progress view (``status --watch``): rendered from real status snapshots to plain text."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path

import pytest
from conftest import write_manifest
from rich.console import Console

from s3cache import resolve
from s3cache.service.progress import eta_text, landing, render
from s3cache.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent


def undocumented(st: dict) -> set[str]:
    """Fields of a status dict that the `status --json` table (docs/operating.md) does not name."""
    doc = (ROOT / "docs" / "operating.md").read_text()
    table = doc[doc.index("## `status --json`"):]
    table = table[: table.index("\n## ", 5)]
    names = set()
    for key, value in st.items():
        if isinstance(value, dict) and key in ("objects", "bytes", "pinned"):
            names.update(f"{key}.{k}" for k in value)
        else:
            names.add(key)
    return {n for n in names if f"`{n}`" not in table and f"`.{n.rpartition('.')[2]}`" not in table}


def text_of(st: dict) -> str:
    console = Console(file=StringIO(), width=140, color_system=None)
    console.print(render(st))
    return console.file.getvalue()


def test_eta_text():
    assert eta_text(None) == "unknown"
    assert eta_text(12.4) == "12s"
    assert eta_text(190) == "3m 10s"
    assert eta_text(3725) == "1h 02m"


def test_progress_of_a_real_daemon(tmp_path, s3, bucket, daemons):
    uris = []
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"k{i}", Body=bytes(2048))
        uris.append(f"s3://{bucket}/k{i}")
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [*uris, f"s3://{bucket}/gone"]),
                args=["--max-size", "1M"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 3 and st["objects"]["failed"] == 1)
    assert not undocumented(st), "document these status --json fields in docs/operating.md"
    out = text_of(st)
    assert "3 of 4 ready, 0 fetching, 0 queued, 1 failed" in out
    assert "6.0 KiB of 1.0 MiB (0.6%)" in out  # cache fill against the maximum
    # landed of the estimated total: the failed object, whose size is never learned, counts as the
    # average of the sizes known (2 KiB): 8 KiB in all
    assert st["manifest_bytes"] == {"total": 6144, "ready": 6144, "unknown_sizes": 1}
    assert "6.0 KiB of ~8.0 KiB (75.0%)" in out
    assert "ETA 0s" in out
    assert f"s3://{bucket}/gone: NoSuchKey" in out and "1 failed:" in out
    assert "0 hits, 0 misses" in out and "0.0s spent waiting" in out

    resolve(uris, cache_dir=d.cache_dir, timeout=120)
    st = d.wait_until(lambda st: st["hits"] == 3 and st["readers"] == 1)
    out = text_of(st)
    assert "3 hits, 0 misses (hit rate 100.0%)" in out
    assert re.search(r"^readers\s+1\s", out, re.M)


def test_eta_from_throughput_and_manifest_bytes():
    """The figures the view derives: with the manifest's total in status, and estimated without it."""
    st = {"cache_dir": "/c", "pid": 1, "uptime": 10.0, "manifest": "/m.txt", "manifest_entries": 10,
          "objects": {"queued": 6, "fetching": 2, "ready": 2, "failed": 0},
          "bytes": {"ready": 200 << 20, "reserved": 50 << 20, "max": 1 << 30, "free_fraction": 0.5},
          "throughput_bytes_per_s": 100 << 20, "failures": [], "manifest_errors": [], "disk_full": False,
          "prefetch_paused": False, "readers": 2, "hits": 3, "misses": 1, "wait_seconds": 4.25, "fetched": 2,
          "fetched_bytes": 200 << 20, "evicted": 0, "evicted_bytes": 0, "requests": 4, "retries": 1}
    # Without manifest_bytes: 8 objects to come at 100 MiB each (the average so far), at 100 MiB/s.
    assert landing(st) == (200 << 20, 1000 << 20, 8.0, True)
    out = text_of(st)
    assert "200.0 MiB of ~1000.0 MiB (20.0%)" in out and "ETA ~8s (estimated from the average" in out
    assert "100.0 MiB/s" in out and "wait" in out and "4.2s spent waiting" in out
    assert "3 hits, 1 misses (hit rate 75.0%)" in out
    # With it: exact.
    st["manifest_bytes"] = {"total": 2000 << 20, "ready": 200 << 20, "unknown_sizes": 0}
    assert landing(st) == (200 << 20, 2000 << 20, 18.0, False)
    out = text_of(st)
    assert "200.0 MiB of 2.0 GiB (10.0%)" in out and "ETA 18s" in out and "~" not in out
    # Two entries without a size: each counts as the average of the eight sizes given (100 MiB).
    st["manifest_bytes"] = {"total": 800 << 20, "ready": 200 << 20, "unknown_sizes": 2}
    assert landing(st) == (200 << 20, 1000 << 20, 8.0, True)
    assert "ETA ~8s (estimated from the average object size)" in text_of(st)
    st["disk_full"] = True
    assert "the cache filesystem is full" in text_of(st)


def test_status_watch_redraws_until_interrupted(tmp_path, s3, bucket, daemons):
    """The real command, output to a pipe: one plain frame per interval, Ctrl-C ends it cleanly."""
    s3.put_object(Bucket=bucket, Key="a", Body=b"abc")
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a"]))
    d.wait_until(lambda st: st["objects"]["ready"] == 1)
    proc = subprocess.Popen([sys.executable, "-m", "s3cache", "status", "--cache-dir", str(d.cache_dir),
                             "--watch", "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: sum(line.startswith("objects ") and "1 ready" in line for line in lines) >= 2, 60,
                 "two frames")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    out = "".join(lines)
    assert "\x1b[" not in out  # a pipe gets no cursor movement or colour
    # plain lines: no bar characters, and a long line stays one line (rich wrapped them at 80 columns)
    assert not set(out) & set("━╸╺─"), out
    assert any(line.startswith("cache dir   ") and str(d.cache_dir) in line for line in lines)
    assert max(len(line) for line in lines) > 80 and all(line.rstrip("\n") == line.rstrip("\n").rstrip() for line in lines)
    # exact, not estimated: status's manifest_bytes counts the size learned from S3
    assert "3 B of 3 B (100.0%)" in out


@pytest.mark.parametrize("as_json", [False, True])
def test_status_watch_without_a_daemon_is_one_clear_line(tmp_path, as_json):
    from click.testing import CliRunner

    from s3cache.cli import main

    r = CliRunner().invoke(main, ["status", "--cache-dir", str(tmp_path / "c"), "--watch",
                                  *(["--json"] if as_json else [])])
    assert r.exit_code == 1 and "no s3cache daemon serves" in r.output and "Traceback" not in r.output
