"""How one setting is written and read back: sizes, readahead, URLs, and the ``Kind`` of each option.

A ``Kind`` turns what a flag, an environment variable or a TOML key holds into a value (``parse``),
checks its range (``check``) and writes it back in a form ``parse`` reads (``format``, for ``config
show``). Invariants: ``parse`` and ``check`` raise only ConfigError, whose message states the expected
form; ``kind.parse(kind.format(v)) == v`` for every value a kind accepts; a URL's password never leaves
this module unmasked (``Url.format``, ``redact_url``, ``redact_urls``). Pure: no I/O, no click. The table
of options that uses these kinds is ``config.Settings``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from s3cache.errors import ConfigError
from s3cache.manifest.scope import parse_allow_list
from s3cache.manifest.shard import Shard, parse_shard

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
                          "0 for the most, 1/16 of the files the cache holds)") from None



def redact_url(url: str) -> str:
    """``https://user:pw@host/`` -> ``https://user:***@host/``: a URL as it may be printed."""
    return redact_urls(url)


# The password runs to the LAST '@' of the word: a password may hold '@', '/', '#' or '?' unencoded
# (urlsplit then ends the netloc early and sees none). A later '@' in a path hides more than the
# password, never less.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):\S*@")


def redact_urls(text: str) -> str:
    """Every ``scheme://user:password@`` in free text (an error message that quotes the endpoint, say)
    with the password replaced by ``***``, as ``redact_url`` does for one URL."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)



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
