"""What /proc says about a process: CPU seconds and memory, for the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int, field: str = "VmRSS") -> int:
    """Bytes of a /proc/PID/status memory field: VmRSS now, VmHWM the peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def compiled(package: str | os.PathLike | None = None) -> None:
    """Write s3cache's bytecode next to its sources, as pip does at install. Under
    PYTHONDONTWRITEBYTECODE (set in some CI and dev shells) every daemon start would otherwise compile
    every module again: 0.1-0.25 CPU-s that no installed daemon pays, counted as start-up."""
    import compileall

    if package is None:
        import s3cache

        package = os.path.dirname(s3cache.__file__)
    compileall.compile_dir(package, quiet=1)
