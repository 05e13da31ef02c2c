"""Settings for the daemon, validated once at the edge so the rest of the code can trust them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .shard import WHOLE, Shard

DEFAULT_CACHE_DIR = "/var/cache/s3cache"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``"500G"``, ``"1.5T"``, ``"64MiB"`` or a plain integer. Units are binary (1K = 1024)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (use bytes or a number with K, M, G, T, e.g. 500G)")
    number, unit = m.groups()
    return int(float(number) * _UNITS[unit.upper()])


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: for logs and status, never parsed back."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def parse_readahead(text: str) -> tuple[int, int]:
    """``"2G"`` -> (bytes, 0); ``"8 files"`` or ``"8f"`` -> (0, 8)."""
    m = re.match(r"^\s*(\d+)\s*(f|files?)\s*$", str(text), re.IGNORECASE)
    if m:
        return 0, int(m.group(1))
    return parse_size(text), 0


def default_cache_dir() -> str:
    """The cache dir a reader uses when none is given: ``$S3CACHE_DIR`` or the system default."""
    return os.environ.get("S3CACHE_DIR") or DEFAULT_CACHE_DIR


@dataclass(frozen=True)
class Settings:
    """Everything ``s3cache serve`` is told. Sizes are bytes, times are seconds."""

    cache_dir: Path
    manifest: Path | None = None
    max_size: int = 100 << 30
    workers: int = 16
    part_size: int = 16 << 20  # ranged parts of an object a reader waits on
    prefetch_part_size: int = 64 << 20  # ... and of one prefetched with others in flight
    lease: float = 600.0
    readahead: int = 0  # bytes fetched ahead of each in-order reader; 0 = auto (1/8 of max_size)
    readahead_files: int = 0  # ... or a number of files, when given
    min_free: float = 0.05
    low_watermark: float = 0.90
    endpoint_url: str | None = None
    region: str | None = None
    read_timeout: float = 30.0
    connect_timeout: float = 10.0
    max_attempts: int = 8
    revalidate: float = 0.0
    shard: Shard = WHOLE  # this host's share of the manifest (--shard I/N, or auto from TF_CONFIG)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_size <= 0:
            raise ConfigError("--max-size must be positive")
        if not 1 <= self.workers <= 512:
            raise ConfigError("--workers must be between 1 and 512")
        if self.part_size < (1 << 20):
            raise ConfigError("--part-size must be at least 1M")
        if self.prefetch_part_size < (1 << 20):
            raise ConfigError("--prefetch-part-size must be at least 1M")
        if self.lease < 0:
            raise ConfigError("--lease must not be negative")
        if not 0 <= self.min_free < 1:
            raise ConfigError("--min-free must be a fraction between 0 and 1 (e.g. 0.05)")
        if not 0 < self.low_watermark <= 1:
            raise ConfigError("--low-watermark must be a fraction between 0 and 1")
        if self.read_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if self.max_attempts < 1:
            raise ConfigError("--max-attempts must be at least 1")
        if not (isinstance(self.shard, Shard) and 0 <= self.shard.index < self.shard.count):
            raise ConfigError(f"--shard must be I/N with 0 <= I < N, got {self.shard!r}")

    @property
    def readahead_bytes(self) -> int:
        return self.readahead or max(self.max_size // 8, self.part_size)
