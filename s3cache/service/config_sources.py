"""Where each setting comes from: flag > environment > TOML file > default.

``load()`` reads the TOML file (``--config PATH``, else ``$S3CACHE_CONFIG``, else
``/etc/s3cache/config.toml`` if it exists) and the environment, lays the flags over them, and returns
the ``Settings`` with the source of every value. Every malformed value is a ConfigError naming where it
was written (the file and key, or the environment variable) and the form expected. The table of options
is ``config.Settings``; nothing here knows an option by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3cache.errors import ConfigError

from .config import Option, PathKind, Settings, options

DEFAULT_CONFIG = Path("/etc/s3cache/config.toml")
CONFIG_ENV = "S3CACHE_CONFIG"

DEFAULT = "default"
FLAG = "flag"


@dataclass(frozen=True)
class Effective:
    """The settings ``serve`` runs with and, per option name, where its value came from:
    ``default``, ``file:PATH``, ``env:NAME`` or ``flag``."""

    settings: Any  # a Settings (or the table given to load())
    sources: dict[str, str]
    config_file: Path | None

    def show(self) -> list[str]:
        """``config show``'s lines: ``key = value  # source``, TOML that reads back (secrets left out)."""
        lines = [f"# s3cache serve: configuration file {self.config_file or '(none)'}"]
        rows = [(o, getattr(self.settings, o.name)) for o in options(type(self.settings))]
        width = max(len(o.name) for o, _ in rows)
        for opt, value in rows:
            text = opt.format(value)
            if value is None or opt.secret:
                lines.append(f"# {opt.name:<{width}} = {text}  # {self.sources[opt.name]}")
            else:
                lit = _toml_literal(value, text)
                lines.append(f"{opt.name:<{width}} = {lit}  # {self.sources[opt.name]}")
        return lines

    def as_json(self) -> str:
        """The same as ``show()`` for scripts: ``{key: {"value": ..., "source": ...}}``; a secret's value is
        null with ``"secret": true``."""
        out = {}
        for opt in options(type(self.settings)):
            value = getattr(self.settings, opt.name)
            row: dict[str, Any] = {"source": self.sources[opt.name]}
            if opt.secret:
                row.update(value=None, secret=True, set=value is not None)
            else:
                row["value"] = None if value is None else _json_value(value, opt.format(value))
            out[opt.name] = row
        return json.dumps(out, indent=2, sort_keys=True)


def _toml_literal(value: Any, text: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and text == str(value):
        return text
    return json.dumps(text)  # a TOML basic string: JSON's escapes are a subset


def _json_value(value: Any, text: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and text == str(value):
        return value
    return text


def config_path(flag: Path | None, environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The configuration file to read and whether it was asked for (then it must exist)."""
    if flag is not None:
        return Path(flag), True
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), True
    return (DEFAULT_CONFIG, False) if DEFAULT_CONFIG.exists() else (None, False)


def read_file(path: Path, table: type = Settings) -> dict[str, Any]:
    """Parsed and checked values by option name from a TOML file. Relative paths in it are taken
    relative to the file's directory."""
    import tomllib  # a file is the exception, not the rule: most starts have none to parse

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except PermissionError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    by_name = {o.name: o for o in options(table)}
    values = {}
    for key, raw in doc.items():
        opt = by_name.get(key)
        if opt is None:
            import difflib  # only for this error's hint

            close = difflib.get_close_matches(key.replace("-", "_").lower(), by_name, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(by_name)
            raise ConfigError(f"{path}: unknown key '{key}' ({hint})")
        value = _parse(opt, raw, f"{path}: key '{key}'")
        if isinstance(opt.kind, PathKind) and not value.is_absolute():
            value = path.absolute().parent / value
        values[key] = value
    return values


def read_env(environ: Mapping[str, str], table: type = Settings) -> dict[str, tuple[Any, str]]:
    """(value, variable name) by option name from the environment; an empty variable counts as unset."""
    values = {}
    for opt in options(table):
        for name in opt.env:
            if environ.get(name, "") != "":
                values[opt.name] = (_parse(opt, environ[name], f"environment variable {name}"), name)
                break
    return values


def _parse(opt: Option, raw: Any, where: str) -> Any:
    try:
        value = opt.kind.parse(raw)
        opt.kind.check(value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return value


def load(flags: Mapping[str, Any] | None = None, *, config: Path | None = None,
         environ: Mapping[str, str] | None = None, table: type = Settings) -> Effective:
    """The effective settings. ``flags`` holds only the options given on the command line, already
    parsed and checked; ``config`` is ``--config`` (None: ``$S3CACHE_CONFIG`` or the default file)."""
    environ = os.environ if environ is None else environ
    path, _ = config_path(config, environ)
    values: dict[str, Any] = {}
    sources = {o.name: DEFAULT for o in options(table)}
    if path is not None:
        for name, value in read_file(path, table).items():
            values[name], sources[name] = value, f"file:{path}"
    for name, (value, var) in read_env(environ, table).items():
        values[name], sources[name] = value, f"env:{var}"
    for name, value in (flags or {}).items():
        if name not in sources:
            raise ConfigError(f"unknown option {name!r}")
        values[name], sources[name] = value, FLAG
    return Effective(table(**values), sources, path)
