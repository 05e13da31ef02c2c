"""``s3cache serve`` and ``s3cache config show``: the daemon in the foreground, and the settings it would use.

Both take one flag per row of the settings table (``config.Settings``), parsed and checked by the row's
``Kind`` exactly as the configuration file's key is. Invariant: no click defaults or envvars here;
``config_sources.load`` layers flag > environment > file > default and records where each value came
from. Every log line serve writes is one line of printable text with URL passwords masked (``_OneLine``).
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

import click

from s3cache.service.config import Bool, Kind, Option, options
from s3cache.service.config_sources import CONFIG_ENV, DEFAULT_CONFIG, Effective, load

from ..errors import ConfigError
from .common import main, run


class _KindType(click.ParamType):
    """A click type from a ``config.Kind``: the flag is parsed and checked exactly as the file's key is."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.name = kind.metavar

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            parsed = self.kind.parse(value)
            self.kind.check(parsed)
        except ConfigError as e:
            self.fail(str(e), param, ctx)
        return parsed


def _option_help(opt: Option) -> str:
    default = "unset" if opt.default is None else opt.format(opt.default)
    env = ", ".join(f"${name}" for name in opt.env)
    return f"{opt.help} [default: {default}; env: {env}; file key: {opt.name}]"


def _joined(ctx, param, values: tuple) -> tuple | None:
    """A repeatable option's values (each a tuple) as one tuple; None when it was not given."""
    return tuple(dict.fromkeys(item for value in values for item in value)) if values else None


def serve_options(fn):
    """``--config`` and one flag per row of the settings table (``config.Settings``).

    No click defaults or envvars: ``config_sources.load`` layers flag > environment > file > default and
    records where each value came from."""
    for opt in reversed(options()):
        if isinstance(opt.kind, Bool):
            fn = click.option(f"{opt.flag}/--no-{opt.flag[2:]}", opt.name, default=None,
                              help=_option_help(opt))(fn)
            continue
        if getattr(opt.kind, "repeatable", False):  # --allow A --allow B: one value, A's items then B's
            fn = click.option(opt.flag, opt.name, type=_KindType(opt.kind), multiple=True, metavar=opt.kind.metavar,
                              callback=_joined, help=_option_help(opt))(fn)
            continue
        fn = click.option(opt.flag, opt.name, type=_KindType(opt.kind), default=None, metavar=opt.kind.metavar,
                          help=_option_help(opt))(fn)
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help=f"TOML file of settings (keys as listed below). [default: {DEFAULT_CONFIG} if it exists; "
        f"env: ${CONFIG_ENV}]")(fn)


def _effective(config_file: Path | None, given: dict) -> Effective:
    return run(load, {k: v for k, v in given.items() if v is not None}, config=config_file)


@main.command(epilog="Precedence: flag > environment > configuration file > default. "
              "`s3cache config show` prints the result. Without --manifest, objects are fetched on demand only.")
@serve_options
def serve(config_file: Path | None, **given) -> None:
    """Run the daemon in the foreground (systemd runs it): prefetch, verify, serve readers.

    On a terminal it draws a progress bar; otherwise (systemd, a pipe) it writes plain log lines, one
    per event, with an INFO progress line every few seconds while work is pending. SIGHUP re-reads
    the configuration and the manifest."""
    Daemon = _load_daemon()
    flags = {k: v for k, v in given.items() if v is not None}
    settings = _effective(config_file, given).settings
    bar = _serve_logging(settings.log_level)
    daemon = Daemon(settings, flags=flags, config_file=config_file)
    if bar is not None:
        daemon.on_progress = bar.update
    metrics = None
    try:
        if settings.metrics_addr is not None:
            from s3cache.service.metrics import parse_addr, serve_metrics

            run(parse_addr, settings.metrics_addr, settings.metrics_allow_remote)
            metrics = run(serve_metrics, settings.metrics_addr, daemon.status, daemon.fetch_histogram,
                           allow_remote=settings.metrics_allow_remote)
        code = run(daemon.run)
    finally:
        if metrics is not None:
            metrics.stop()
        if bar is not None:
            bar.stop()
    sys.exit(code)


def _load_daemon() -> type:
    """The daemon's class, its modules imported with the cyclic GC paused and then frozen.

    Those modules (botocore, awscrt, ours: ~60,000 objects that live as long as the process, none of
    them garbage) are most of a start's CPU, and the GC, left on, walks the growing heap again and again
    while they are made. Paused for this import only (bounded work, so no garbage can pile up), and
    what it made is then frozen out of later collections (``gc.freeze``): the S3 client's creation next
    and every later full collection skip it. ~10 ms of CPU of every start (docs/benchmarks.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from s3cache.daemon.root import Daemon
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return Daemon


class _OneLine(logging.Formatter):
    """Every log line is one line of printable text without secrets: a message quoting an S3 key with a
    newline or ESC cannot forge a line or reach a terminal raw, and a URL's password is masked."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from s3cache.manifest.refs import printable
        from s3cache.service.config import redact_urls

        record.message = printable(redact_urls(record.message))
        return super().formatMessage(record)


def _serve_logging(level: str):
    """Log to stderr: through rich with a progress bar on a terminal (returned), plain lines otherwise."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    # boto's own loggers would print request details (and with debug, signed headers): keep them quiet.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        from s3cache.service.progress import ServeBar

        bar = ServeBar()
        handler = RichHandler(console=bar.console, show_path=False, markup=False)
        handler.setFormatter(_OneLine("%(name)s: %(message)s"))
        root.addHandler(handler)
        return bar
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return None


@main.group()
def config() -> None:
    """Inspect serve's configuration."""


@config.command("show", epilog="Secrets (a password in an endpoint URL, tokens) are never printed.")
@serve_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: {key: {value, source}}.")
def config_show(config_file: Path | None, as_json: bool, **given) -> None:
    """Print the settings serve would run with, and where each came from (default, file:PATH, env:NAME
    or flag). Takes serve's options, so `config show --workers 4` shows their effect too."""
    eff = _effective(config_file, given)
    click.echo(eff.as_json() if as_json else "\n".join(eff.show()))

