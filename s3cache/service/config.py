"""Settings for the daemon, validated once at the edge so the rest of the code can trust them.

``Settings`` is also the one table of ``serve``'s options: each field is declared with ``setting()``,
which records how the value is written (its ``Kind``), its help and whether it is secret. The flag
(``--max-size``), the environment variable (``S3CACHE_MAX_SIZE``), the TOML key (``max_size``), the
``serve --help`` text and ``s3cache config show`` are all derived from that table, so adding an option
is one line here (plus the code that uses it). This module does no I/O and never imports click.

How each value is written and checked (sizes, readahead, URLs, the ``Kind`` classes) is ``kinds``;
its names are re-exported here, where the rest of the code has always imported them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from s3cache.errors import ConfigError
from s3cache.manifest.shard import WHOLE, Shard

from .kinds import (  # noqa: F401 (re-exported)
    PATH,
    READAHEAD,
    SECONDS,
    SIZE,
    TEXT,
    URL,
    Bool,
    Choice,
    Int,
    Kind,
    MetricsAddr,
    Number,
    PathKind,
    Prefixes,
    Readahead,
    ReadaheadKind,
    ShardKind,
    Size,
    Url,
    format_size,
    human_size,
    parse_readahead,
    parse_size,
    redact_url,
    redact_urls,
)

DEFAULT_CACHE_DIR = "/var/cache/s3cache"
_HOST_PORT = re.compile(r"(\[([^\]]*)\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def peer_address(text: str, where: str = "--peer-addr") -> str:
    """``text`` (HOST:PORT) in the one form every host writes a peer: an IPv6 address in brackets and
    compressed (``[::1]:7480`` however it was spelled), the port without leading zeros. Peers are
    compared as text (``--peer-addr`` must be in ``--peers``, owners are picked by it), so two
    spellings of one address must become one. Raises ConfigError naming ``where``."""
    text = text.strip() if isinstance(text, str) else repr(text)
    m = _HOST_PORT.fullmatch(text)
    if m is None or not 0 < int(m.group(3)) < 65536:
        hint = ("an IPv6 address goes in brackets, e.g. [fd00::7]:7480" if text.count(":") > 1
                and not text.startswith("[") else "expected e.g. 10.0.0.7:7480 or [fd00::7]:7480")
        raise ConfigError(f"{where}: not HOST:PORT: {text!r} ({hint})")
    port = int(m.group(3))
    if m.group(2) is None:
        return f"{m.group(1)}:{port}"
    try:
        ip = ipaddress.IPv6Address(m.group(2))
    except ValueError:
        raise ConfigError(f"{where}: not an IPv6 address in brackets: {text!r}") from None
    return f"[{ip.compressed}]:{port}"


class PeerAddr(Kind):
    """``HOST:PORT`` of a peer (``peer_address``: an IPv6 address as ``[::1]:7480``)."""

    metavar = "HOST:PORT"

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ConfigError(f"not HOST:PORT: {raw!r} (expected e.g. 10.0.0.7:7480 or [fd00::7]:7480)")
        return peer_address(raw)

    def check(self, value: str) -> None:
        if peer_address(value) != value:  # a Settings built in code holds the canonical form too
            raise ConfigError(f"--peer-addr {value!r} is not written as {peer_address(value)!r}")
ENV_PREFIX = "S3CACHE_"


def default_cache_dir() -> str:
    """The cache dir a reader uses when none is given: ``$S3CACHE_DIR`` or the system default."""
    return os.environ.get("S3CACHE_DIR") or DEFAULT_CACHE_DIR


# == the table ========================================================================================


@dataclass(frozen=True)
class Option:
    """One row of the table, derived from a ``Settings`` field."""

    name: str  # the field, and the TOML key
    kind: Kind
    default: Any
    help: str
    env: tuple[str, ...]  # environment variables, first wins
    secret: bool = False  # never printed, only whether it is set

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def format(self, value: Any) -> str:
        if value is None:
            return "(unset)"
        return "(secret, set)" if self.secret else self.kind.format(value)


_OPTION = "s3cache.option"


def setting(kind: Kind, default: Any, help: str, *, env: str | tuple[str, ...] = (), secret: bool = False) -> Any:
    """Declare a ``Settings`` field as an option. ``env`` replaces the derived ``S3CACHE_<NAME>``."""
    names = (env,) if isinstance(env, str) else tuple(env)
    return field(default=default, metadata={_OPTION: (kind, help, names, secret)})


@dataclass(frozen=True)
class Settings:
    """Everything ``s3cache serve`` is told, and the table its options are derived from.

    Invariant: every field holds a value its kind parsed and checked (``__post_init__`` re-checks, so a
    Settings built in code is as trustworthy as one read from flags). Sizes are bytes, times seconds.
    """

    cache_dir: Path = setting(PATH, Path(DEFAULT_CACHE_DIR), "The cache directory.", env="S3CACHE_DIR")
    manifest: Path | None = setting(PATH, None, "Objects to prefetch, one s3:// URI per line, in order; "
                                    "watched for changes. Without one, files are fetched on demand only, "
                                    "under --allow.")
    max_size: int = setting(Size(1), 100 << 30, "Bytes of cached files at most (e.g. 500G, 1.5T).")
    workers: int = setting(Int(1, 512), 16, "Objects fetched in parallel (and parts of one large object).")
    part_size: int = setting(Size(1 << 20), 16 << 20, "Ranged-GET part size of an object a reader waits on.")
    prefetch_part_size: int = setting(Size(1 << 20), 64 << 20,
                                      "Ranged-GET part size when prefetching (many objects in flight already).")
    lease: float = setting(SECONDS, 600.0, "Seconds a reader's lease lasts: its two newest resolved files are "
                           "kept that long, older ones it resolved within it only while they fit its share of a "
                           "budget of 1/32 of max-size.")
    readahead: Readahead = setting(READAHEAD, Readahead(), "How far ahead of each in-order reader to fetch "
                                   "when the cache is full: bytes (2G) or files (8f), at most 1/16 of the files the cache "
                                   "holds; 0: that most.")
    min_free: float = setting(Number(0, 1, hi_open=True, what="a fraction, e.g. 0.05"), 0.05,
                              "Pause prefetch when the filesystem's free fraction falls below this.")
    low_watermark: float = setting(Number(0, 1, lo_open=True, what="a fraction, e.g. 0.9"), 0.90,
                                   "When evicting, free space down to this fraction of max-size.")
    pin_quota: float = setting(Number(0, 1, what="a fraction, e.g. 0.5"), 0.5,
                               "Pinned objects may hold at most this fraction of max-size (`s3cache pin` beyond it "
                               "is refused).")
    endpoint_url: str | None = setting(URL, None, "S3 endpoint (S3-compatible stores, tests).",
                                       env=("S3CACHE_ENDPOINT_URL", "AWS_ENDPOINT_URL"))
    region: str | None = setting(TEXT, None, "AWS region (default: boto3's configuration).",
                                 env=("S3CACHE_REGION", "AWS_REGION"))
    read_timeout: float = setting(Number(0, lo_open=True, what="seconds"), 30.0,
                                  "Seconds without a byte before a request is retried.")
    connect_timeout: float = setting(Number(0, lo_open=True, what="seconds"), 10.0,
                                     "Seconds to wait for a connection to S3.")
    max_attempts: int = setting(Int(1), 8, "Attempts per request.")
    revalidate: float = setting(SECONDS, 0.0, "Every this many seconds, ask S3 whether cached objects "
                                "changed (0: never).")
    log_level: str = setting(Choice(("debug", "info", "warning", "error")), "info", "Log verbosity.")
    transport: str = setting(Choice(("crt", "botocore")), "crt", "How small prefetched objects are fetched: "
                             "crt (AWS's Common Runtime client, a fraction of botocore's CPU per object) or "
                             "botocore (every object through botocore).")
    require_checksum: bool = setting(Bool(), False, "Refuse to publish an object that has no check stronger "
                                     "than its size (no manifest digest, no S3 checksum, no MD5 ETag).")
    allow: tuple[str, ...] = setting(Prefixes(), (), "Readers may also have objects under this prefix fetched "
                                     "on demand (s3://bucket/prefix/, s3://bucket/ for a bucket; repeatable). "
                                     "Beyond these, only the manifest's objects and prefixes are fetched for them.")
    world_readable: bool = setting(Bool(), False, "Cached files 0644 and directories 0755 instead of readable "
                                   "by the cache dir's group only (0640/0750).")
    metrics_addr: str | None = setting(MetricsAddr(), None, "Serve Prometheus metrics on HOST:PORT (e.g. "
                                       "127.0.0.1:9109; loopback unless --metrics-allow-remote). Default: none.")
    metrics_allow_remote: bool = setting(Bool(), False, "Allow a --metrics-addr that is not loopback (a scraper "
                                         "on the network).")
    shard: Shard = setting(ShardKind(), WHOLE, "Prefetch only this host's share I/N of the manifest (positions "
                           "p with p % N == I, as tf.data's Dataset.shard(N, I)), or 'auto' to take it from "
                           "TF_CONFIG.")
    manifest_settle: float = setting(Number(0, hi=60, what="seconds"), 0.25, "Seconds the manifest file must "
                                     "go unmodified before it is installed, so that a rewrite in place is never "
                                     "read half-written (a writer pausing longer can still be caught; renaming "
                                     "a new file over the manifest is always safe).")
    manifest_dir: Path | None = setting(PATH, None, "A directory of manifests, one job per NAME.txt file: each "
                                        "watched, added by writing its file and retired by removing it; "
                                        "prefetch takes the jobs in turn. Instead of --manifest.")

    peers: str | None = setting(TEXT, None, "The fleet's hosts that serve each other cached files, in one order "
                                "on every host: HOST:PORT,HOST:PORT..., a file of them (one a line), "
                                "'tf_config' (TF_CONFIG's chief and workers) or dns:NAME (a headless "
                                "Service), the last two on --peer-addr's port; a file or DNS is read again "
                                "every 30 s. Needs --peer-addr and --peer-secret-file.")
    peer_addr: str | None = setting(PeerAddr(), None, "This host in --peers: HOST:PORT, where it serves its "
                                    "files to peers (an IPv6 address in brackets: [fd00::7]:7480).")
    peer_secret_file: Path | None = setting(PATH, None, "A file holding the secret (16 bytes or more) that "
                                            "signs requests between peers; not readable by others.")
    peer_timeout: float = setting(Number(0, lo_open=True, what="seconds"), 2.0, "Seconds a fetch waits on "
                                  "the owning peer (which may be fetching the object itself) before it goes "
                                  "to S3; keep it near S3's time to first byte.")
    peer_rate: int = setting(Size(0), 0, "Bytes/s this host serves to each peer at most (0: no limit).")

    def __post_init__(self) -> None:
        if self.manifest is not None and self.manifest_dir is not None:
            raise ConfigError("--manifest and --manifest-dir both given: one job's manifest, or a "
                              "directory of jobs' manifests, not both")
        for opt in options():
            value = getattr(self, opt.name)
            if value is None:
                continue
            try:
                opt.kind.check(value)
            except ConfigError as e:
                raise ConfigError(f"{opt.flag} {e}") from None

        if self.peers is not None and (self.peer_addr is None or self.peer_secret_file is None):
            raise ConfigError("--peers needs --peer-addr (this host's HOST:PORT in the list) and "
                              "--peer-secret-file (the fleet's shared secret)")

    @property
    def manifest_source(self) -> Path | None:
        """The manifest file or directory the daemon reads (``manifest_is_dir`` says which)."""
        return self.manifest if self.manifest is not None else self.manifest_dir

    @property
    def manifest_is_dir(self) -> bool:
        return self.manifest is None and self.manifest_dir is not None

    @property
    def readahead_bytes(self) -> int:
        return self.readahead.bytes or max(self.max_size // 8, self.part_size)

    @property
    def readahead_files(self) -> int:
        return self.readahead.files


def options(table: type = Settings) -> list[Option]:
    """The rows of ``table`` (``Settings``, or another dataclass declared with ``setting()``)."""
    rows = []
    for f in fields(table):
        if _OPTION not in f.metadata:
            continue
        kind, help_text, env, secret = f.metadata[_OPTION]
        default = f.default if f.default is not MISSING else None
        rows.append(Option(f.name, kind, default, help_text, env or (ENV_PREFIX + f.name.upper(),), secret))
    return rows
