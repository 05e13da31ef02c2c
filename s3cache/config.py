"""Settings for the daemon, validated once at the edge so the rest of the code can trust them.

``Settings`` is also the one table of ``serve``'s options: each field is declared with ``setting()``,
which records how the value is written (its ``Kind``), its help and whether it is secret. The flag
(``--max-size``), the environment variable (``S3CACHE_MAX_SIZE``), the TOML key (``max_size``), the
``serve --help`` text and ``s3cache config show`` are all derived from that table, so adding an option
is one line here (plus the code that uses it). This module does no I/O and never imports click.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .scope import parse_allow_list
from .shard import WHOLE, Shard, parse_shard

DEFAULT_CACHE_DIR = "/var/cache/s3cache"
ENV_PREFIX = "S3CACHE_"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_FORM = "use bytes or a number with K, M, G, T, e.g. 500G"


def parse_size(text: str | int) -> int:
    """Bytes from ``"500G"``, ``"1.5T"``, ``"64MiB"`` or a plain integer. Units are binary (1K = 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m or isinstance(text, bool):
        raise ConfigError(f"not a size: {text!r} ({_SIZE_FORM})")
    number, unit = m.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(n: int) -> str:
    """The shortest exact form ``parse_size`` reads back: ``107374182400`` -> ``"100G"``."""
    for unit in ("P", "T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: for logs and status, never parsed back."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


class Readahead(NamedTuple):
    """How far ahead of an in-order reader to fetch: bytes, or a number of files (one of them is 0)."""

    bytes: int = 0
    files: int = 0


def parse_readahead(text: str | int) -> Readahead:
    """``"2G"`` -> (bytes, 0); ``"8 files"`` or ``"8f"`` -> (0, 8)."""
    m = re.match(r"^\s*(\d+)\s*(f|files?)\s*$", str(text), re.IGNORECASE)
    if m and not isinstance(text, bool):
        return Readahead(0, int(m.group(1)))
    try:
        return Readahead(parse_size(text), 0)
    except ConfigError:
        raise ConfigError(f"not a readahead: {text!r} (bytes such as 2G, or a number of files such as 8f; "
                          "0 for 1/8 of max_size)") from None


def default_cache_dir() -> str:
    """The cache dir a reader uses when none is given: ``$S3CACHE_DIR`` or the system default."""
    return os.environ.get("S3CACHE_DIR") or DEFAULT_CACHE_DIR


def redact_url(url: str) -> str:
    """``https://user:pw@host/`` -> ``https://user:***@host/``: a URL as it may be printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):[^/\s@]*@")


def redact_urls(text: str) -> str:
    """Every ``scheme://user:password@`` in free text (an error message that quotes the endpoint, say)
    with the password replaced by ``***``, as ``redact_url`` does for one URL."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


# == kinds: how one setting is written and read back ==================================================


class Kind:
    """How a setting is written (as a flag or environment variable: text; in TOML: text or a number) and
    checked. ``parse`` and ``check`` raise ConfigError whose message states the expected form; ``format``
    gives a form ``parse`` reads back, for ``config show``."""

    metavar = "TEXT"

    def parse(self, raw: Any) -> Any:
        if not isinstance(raw, str):
            raise ConfigError(f"not text: {raw!r} (expected a string)")
        return raw

    def check(self, value: Any) -> None:
        """Raise ConfigError if a well-formed ``value`` is out of range."""

    def format(self, value: Any) -> str:
        return str(value)


def _number(raw: Any, convert: type, form: str) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ConfigError(f"not {form}: {raw!r}")
    try:
        value = convert(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise ConfigError(f"not {form}: {raw!r}") from None
    if isinstance(raw, float) and convert is int and raw != value:
        raise ConfigError(f"not {form}: {raw!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"not {form}: {raw!r}")
    return value


@dataclass(frozen=True)
class Int(Kind):
    lo: int
    hi: int | None = None
    metavar = "INTEGER"

    def parse(self, raw: Any) -> int:
        return _number(raw, int, "an integer")

    def check(self, value: int) -> None:
        if value < self.lo or (self.hi is not None and value > self.hi):
            span = f"between {self.lo} and {self.hi}" if self.hi is not None else f"at least {self.lo}"
            raise ConfigError(f"must be {span}: {value}")


@dataclass(frozen=True)
class Number(Kind):
    """A float in [lo, hi) or [lo, hi]; ``what`` says what it is in messages ("seconds", "a fraction")."""

    lo: float
    hi: float = math.inf
    hi_open: bool = False
    lo_open: bool = False
    what: str = "a number"
    metavar = "NUMBER"

    def parse(self, raw: Any) -> float:
        return float(_number(raw, float, "a number"))

    def check(self, value: float) -> None:
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        high_ok = value < self.hi if self.hi_open else value <= self.hi
        if not (low_ok and high_ok):
            if self.hi != math.inf:
                rule = f"must be between {self.lo:g} and {self.hi:g}"
            elif self.lo == 0:
                rule = "must be positive" if self.lo_open else "must not be negative"
            else:
                rule = f"must be at least {self.lo:g}"
            raise ConfigError(f"{rule} ({self.what}): {value}")


@dataclass(frozen=True)
class Size(Kind):
    minimum: int = 0
    metavar = "SIZE"

    def parse(self, raw: Any) -> int:
        return parse_size(raw)

    def check(self, value: int) -> None:
        if value < self.minimum:
            least = "positive" if self.minimum == 1 else f"at least {format_size(self.minimum)}"
            raise ConfigError(f"must be {least}: {value}")

    def format(self, value: int) -> str:
        return format_size(value)


class PathKind(Kind):
    metavar = "PATH"

    def parse(self, raw: Any) -> Path:
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"not a path: {raw!r} (expected a string such as /var/cache/s3cache)")
        return Path(raw)


class Url(Kind):
    """A URL that may carry a password: ``format`` never shows it."""

    metavar = "URL"

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or not re.match(r"^https?://[^/\s]+", raw):
            shown = redact_url(raw) if isinstance(raw, str) else raw
            raise ConfigError(f"not an http(s) URL: {shown!r} (expected e.g. https://minio.internal:9000)")
        return raw

    def format(self, value: str) -> str:
        return redact_url(value)


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]

    @property
    def metavar(self) -> str:  # type: ignore[override]
        return "[" + "|".join(self.choices) + "]"

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or raw.lower() not in self.choices:
            raise ConfigError(f"not one of {', '.join(self.choices)}: {raw!r}")
        return raw.lower()


class ReadaheadKind(Kind):
    metavar = "SIZE|Nf"

    def parse(self, raw: Any) -> Readahead:
        return parse_readahead(raw)

    def format(self, value: Readahead) -> str:
        return f"{value.files}f" if value.files else format_size(value.bytes)


class Bool(Kind):
    """On or off: a flag (``--x`` / ``--no-x``), ``true``/``false`` (also 1/0, yes/no) in the environment,
    a TOML boolean in the file."""

    metavar = "BOOLEAN"
    _WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}

    def parse(self, raw: Any) -> bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in self._WORDS:
            return self._WORDS[raw.strip().lower()]
        raise ConfigError(f"not a boolean: {raw!r} (expected true or false)")

    def format(self, value: bool) -> str:
        return "true" if value else "false"


class MetricsAddr(Kind):
    """``HOST:PORT`` where Prometheus metrics are served (the host an IP address or localhost)."""

    metavar = "HOST:PORT"

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or not re.fullmatch(r"\s*(\[[0-9a-fA-F:.]+\]|[\w.:-]*):\d{1,5}\s*", raw):
            raise ConfigError(f"not HOST:PORT: {raw!r} (expected e.g. 127.0.0.1:9109)")
        return raw.strip()


class ShardKind(Kind):
    """``I/N`` or ``auto`` (TF_CONFIG, read when the setting is parsed): this host's share of the manifest."""

    metavar = "I/N|auto"

    def parse(self, raw: Any) -> Shard:
        if not isinstance(raw, str):
            raise ConfigError(f"not a shard: {raw!r} (expected I/N such as 3/64, or auto)")
        return parse_shard(raw)

    def check(self, value: Shard) -> None:
        if not (isinstance(value, Shard) and 0 <= value.index < value.count):
            raise ConfigError(f"must be I/N with 0 <= I < N: {value!r}")

    def format(self, value: Shard) -> str:
        return f"{value.index}/{value.count}"


class Prefixes(Kind):
    """S3 prefixes (``s3://bucket/prefix/``): a repeatable flag, text separated by spaces or commas in the
    environment, a list (or such text) in the file. A tuple of canonical prefixes (scope.parse_allow)."""

    metavar = "S3_PREFIX"
    repeatable = True  # the CLI takes the flag several times and joins the values

    def parse(self, raw: Any) -> tuple[str, ...]:
        return parse_allow_list(raw)

    def check(self, value: tuple[str, ...]) -> None:
        parse_allow_list(value)  # a Settings built in code holds well-formed prefixes too

    def format(self, value: tuple[str, ...]) -> str:
        return " ".join(value)


PATH, TEXT, URL, SIZE, READAHEAD = PathKind(), Kind(), Url(), Size(), ReadaheadKind()
SECONDS = Number(0, what="seconds")


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
    lease: float = setting(SECONDS, 600.0, "Seconds a resolved file is protected from eviction.")
    readahead: Readahead = setting(READAHEAD, Readahead(), "How far ahead of each in-order reader to fetch "
                                   "when the cache is full: bytes (2G) or files (8f); 0: 1/8 of max-size.")
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

    def __post_init__(self) -> None:
        for opt in options():
            value = getattr(self, opt.name)
            if value is None:
                continue
            try:
                opt.kind.check(value)
            except ConfigError as e:
                raise ConfigError(f"{opt.flag} {e}") from None

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
