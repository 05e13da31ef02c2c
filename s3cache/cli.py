"""The ``s3cache`` command: a thin click shell over the library.

Every S3CacheError becomes one line on stderr and its exit code (EXIT_CODES: 2 for bad input, as click's
usage errors, 1 otherwise); only a bug prints a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import Bool, Kind, Option, default_cache_dir, human_size, options
from .config_sources import CONFIG_ENV, DEFAULT_CONFIG, Effective, load
from .errors import ConfigError, ManifestError, S3CacheError, UnsafeKey
from .refs import printable, shown

# The one place errors become exit codes. 2 is bad input (what click's UsageError exits with): the user
# must change the command, a setting, the manifest or a URI. 1 is everything else: S3 refused, the
# daemon is not there, time ran out, the cache is full.
BAD_INPUT = click.UsageError.exit_code
EXIT_CODES: dict[type[S3CacheError], int] = {ConfigError: BAD_INPUT, ManifestError: BAD_INPUT, UnsafeKey: BAD_INPUT}


def exit_code(error: S3CacheError) -> int:
    """The exit code for ``error``: that of the nearest class in EXIT_CODES, else 1."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except S3CacheError as e:
        click.echo(f"s3cache: error: {e}", err=True)
        sys.exit(exit_code(e))


cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="S3CACHE_DIR",
    default=default_cache_dir, show_default="$S3CACHE_DIR or /var/cache/s3cache",
    help="The cache directory.")


@click.group()
@click.version_option(__version__, prog_name="s3cache")
def main() -> None:
    """Prefetch S3 objects into a verified local cache; training jobs read plain local files."""


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


def serve_options(fn):
    """``--config`` and one flag per row of the settings table (``config.Settings``).

    No click defaults or envvars: ``config_sources.load`` layers flag > environment > file > default and
    records where each value came from."""
    for opt in reversed(options()):
        if isinstance(opt.kind, Bool):
            fn = click.option(f"{opt.flag}/--no-{opt.flag[2:]}", opt.name, default=None,
                              help=_option_help(opt))(fn)
            continue
        fn = click.option(opt.flag, opt.name, type=_KindType(opt.kind), default=None, metavar=opt.kind.metavar,
                          help=_option_help(opt))(fn)
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help=f"TOML file of settings (keys as listed below). [default: {DEFAULT_CONFIG} if it exists; "
        f"env: ${CONFIG_ENV}]")(fn)


def _effective(config_file: Path | None, given: dict) -> Effective:
    return _run(load, {k: v for k, v in given.items() if v is not None}, config=config_file)


@main.command(epilog="Precedence: flag > environment > configuration file > default. "
              "`s3cache config show` prints the result. Without --manifest, objects are fetched on demand only.")
@serve_options
def serve(config_file: Path | None, **given) -> None:
    """Run the daemon in the foreground (systemd runs it): prefetch, verify, serve readers.

    On a terminal it draws a progress bar; otherwise (systemd, a pipe) it writes plain log lines, one
    per event, with an INFO progress line every few seconds while work is pending. SIGHUP re-reads
    the configuration and the manifest."""
    from .daemon import Daemon

    flags = {k: v for k, v in given.items() if v is not None}
    settings = _effective(config_file, given).settings
    bar = _serve_logging(settings.log_level)
    daemon = Daemon(settings, flags=flags, config_file=config_file)
    if bar is not None:
        daemon.on_progress = bar.update
    metrics = None
    try:
        if settings.metrics_addr is not None:
            from .metrics import parse_addr, serve_metrics

            _run(parse_addr, settings.metrics_addr, settings.metrics_allow_remote)
            metrics = _run(serve_metrics, settings.metrics_addr, daemon.status, daemon.fetch_histogram,
                           allow_remote=settings.metrics_allow_remote)
        code = _run(daemon.run)
    finally:
        if metrics is not None:
            metrics.stop()
        if bar is not None:
            bar.stop()
    sys.exit(code)


class _OneLine(logging.Formatter):
    """Every log line is one line of printable text without secrets: a message quoting an S3 key with a
    newline or ESC cannot forge a line or reach a terminal raw, and a URL's password is masked."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        from .config import redact_urls
        from .refs import printable

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

        from .progress import ServeBar

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


@main.command("resolve")
@cache_dir_option
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (all URIs together).")
@click.argument("uris", nargs=-1, required=True)
def resolve_cmd(cache_dir: Path, timeout: float | None, uris: tuple[str, ...]) -> None:
    """Print the local path of each URI, one a line, waiting until each file has landed.

    Paths that resolved go to stdout in the order given; each URI that did not gets one error line on
    stderr, and the exit code is 2 if a URI was malformed, else 1 if any failed.
    """
    outcomes = _run(_resolve_each, list(uris), cache_dir, timeout)
    codes = []
    for uri, got in outcomes:
        if isinstance(got, S3CacheError):
            text = str(got)
            click.echo(f"s3cache: error: {text if uri in text else f'{uri}: {text}'}", err=True)
            codes.append(exit_code(got))
        else:
            click.echo(got)
    if codes:
        sys.exit(max(codes))


def _resolve_each(uris: list[str], cache_dir: Path, timeout: float | None) -> list[tuple[str, str | S3CacheError]]:
    """Each URI with its path or its own error. All are asked for at once (so they are fetched side by
    side); a failure the batch cannot pin on one URI is settled by asking for the rest one at a time.
    DaemonNotRunning concerns them all and is raised."""
    import time

    from .errors import DaemonNotRunning, FetchFailed
    from .refs import parse_uri
    from .resolve import resolve

    got: dict[int, str | S3CacheError] = {}
    canonical: dict[int, str] = {}
    for i, u in enumerate(uris):
        try:
            canonical[i] = parse_uri(u).uri
        except S3CacheError as e:
            got[i] = e
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    pending = list(canonical)
    while pending:
        try:
            got.update(zip(pending, resolve([uris[i] for i in pending], cache_dir=cache_dir, timeout=left())))
            break
        except DaemonNotRunning:
            raise
        except FetchFailed as e:
            failed = [i for i in pending if canonical[i] == e.uri]
            if failed:
                got.update((i, e) for i in failed)
                pending = [i for i in pending if i not in failed]
                continue
        except S3CacheError:
            pass
        for i in pending:  # which URI the error was about is not known: ask for each alone
            try:
                got[i] = resolve(uris[i], cache_dir=cache_dir, timeout=left())
            except DaemonNotRunning:
                raise
            except S3CacheError as e:
                got[i] = e
        break
    return [(u, got[i]) for i, u in enumerate(uris)]


def _request(cache_dir: Path, msg: dict, timeout: float | None = 60.0) -> dict:
    from .control import Client
    from .layout import Layout

    with Client(Layout(str(cache_dir.absolute())).control_socket, str(cache_dir), timeout=timeout) as c:
        return c.request(msg)


@main.command()
@cache_dir_option
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output (fields in the README); with --watch, one JSON object a line.")
@click.option("--watch", is_flag=True, help="Redraw live progress every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between redraws with --watch.")
def status(cache_dir: Path, as_json: bool, watch: bool, interval: float) -> None:
    """What the daemon is doing: objects by state, bytes against the maximum, throughput, failures."""
    if watch:
        _run(_watch, cache_dir, as_json, interval)
        return
    st = _run(_request, cache_dir, {"op": "status"})["status"]
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    o, b = st["objects"], st["bytes"]
    pct = 100.0 * b["ready"] / b["max"] if b["max"] else 0.0
    click.echo(f"cache dir   {st['cache_dir']} (daemon pid {st['pid']}, up {st['uptime']:.0f}s)")
    click.echo(f"manifest    {st['manifest']} ({st['manifest_entries']} entries)")
    click.echo(f"objects     {o['queued']} queued, {o['fetching']} fetching, {o['ready']} ready, "
               f"{o['failed']} failed")
    click.echo(f"cache use   {human_size(b['ready'])} of {human_size(b['max'])} ({pct:.1f}%), "
               f"{human_size(b['reserved'])} reserved, filesystem {100 * b['free_fraction']:.1f}% free")
    click.echo(f"throughput  {human_size(st['throughput_bytes_per_s'])}/s")
    click.echo(f"readers     {st['readers']} ({st['hits']} hits, {st['misses']} misses, "
               f"{st['wait_seconds']:.1f}s spent waiting)")
    for e in st.get("epochs", []):
        click.echo(f"epoch {e['epoch']:<5} hit rate {100 * e['hit_rate']:.1f}% ({e['hits']} hits, {e['misses']} misses)")
    click.echo(f"fetched     {st['fetched']} files, {human_size(st['fetched_bytes'])}; evicted {st['evicted']} "
               f"files, {human_size(st['evicted_bytes'])}")
    methods = st.get("verified_by", {})
    if methods:
        click.echo("verified    " + ", ".join(f"{k}: {v}" for k, v in sorted(methods.items())))
        if methods.get("size"):
            click.echo(f"warning     {methods['size']} file(s) verified by size alone (no checksum known)")
    if st.get("disk_full"):
        click.echo("warning     the cache filesystem is full: prefetch paused until space returns")
    for f in st["failures"]:
        click.echo(f"failed      {shown(f['uri'])}: {f['code']}")
    for e in st.get("manifest_errors", []):
        click.echo(f"manifest    {printable(e)}")


def _watch(cache_dir: Path, as_json: bool, interval: float) -> None:
    """Fetch status and redraw until Ctrl-C: in place on a terminal, one frame after another otherwise
    (a log or a pipe gets plain text, no cursor movement)."""
    import time

    from rich.console import Console
    from rich.live import Live

    from .progress import render

    console = Console(file=sys.stdout)
    try:
        if as_json:
            while True:
                click.echo(json.dumps(_request(cache_dir, {"op": "status"})["status"], sort_keys=True))
                time.sleep(interval)
        if not console.is_terminal:
            while True:
                console.print(render(_request(cache_dir, {"op": "status"})["status"]))
                console.print()
                console.file.flush()
                time.sleep(interval)
        with Live(render(_request(cache_dir, {"op": "status"})["status"]), console=console,
                  auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(_request(cache_dir, {"op": "status"})["status"]), refresh=True)
    except KeyboardInterrupt:
        return


def _shown(identity: str) -> str:
    """A URI from the daemon (an identity, refs.py) as users write it: percent-encoded as in a manifest."""
    from .refs import format_uri

    try:
        return format_uri(identity)
    except S3CacheError:
        return identity


def _check_uris(uris: tuple[str, ...]) -> list[str]:
    """The URIs as the daemon names them; raises UnsafeKey (exit 2) for the first malformed one, before
    anything is sent, so a typo changes nothing."""
    from .refs import parse_uri

    return [parse_uri(u).uri for u in uris]


# What the daemon's pin/unpin reply says happened to each URI ("outcome"), and whether that is what the
# user asked for. The reply: {"ok": true, "pinned": <URIs pinned in all, CLI and manifest pins each
# counted once>, "results": [{"uri": "s3://...", "outcome": "<one of the keys below>"}, ...]}.
PIN_OUTCOMES: dict[str, dict[str, tuple[str, bool]]] = {
    "pin": {"pinned": ("pinned", True), "already_pinned": ("already pinned", True),
            "manifest": ("already pinned by the manifest", True)},
    "unpin": {"unpinned": ("unpinned", True), "not_pinned": ("not pinned", True),
              "manifest": ("pinned by the manifest: edit the manifest to unpin it", False)},
}


def pin_report(op: str, uris: list[str], reply: dict) -> tuple[list[str], list[str], int]:
    """(stdout lines, stderr lines, exit code) for a pin/unpin reply."""
    out: list[str] = []
    err: list[str] = []
    results = reply.get("results")
    if results is None:  # a daemon from before per-URI results: say only what is known
        out.append(f"asked the daemon to {op} {len(uris)} object(s); {reply['pinned']} pinned in all")
        return out, err, 0
    for r in results:
        text, as_asked = PIN_OUTCOMES[op].get(r["outcome"], (f"unexpected reply {r['outcome']!r}", False))
        uri = _shown(r["uri"])
        if as_asked:
            out.append(f"{text:<15} {uri}")
        else:
            err.append(f"s3cache: error: {uri}: {text}")
    out.append(f"{reply['pinned']} pinned in all")
    return out, err, 1 if err else 0


def _pin_op(op: str, cache_dir: Path, uris: tuple[str, ...]) -> None:
    canonical = _run(_check_uris, uris)
    reply = _run(_request, cache_dir, {"op": op, "uris": canonical})
    out, err, code = pin_report(op, canonical, reply)
    for line in out:
        click.echo(line)
    for line in err:
        click.echo(line, err=True)
    sys.exit(code)


@main.command()
@cache_dir_option
@click.argument("uris", nargs=-1, required=True)
def pin(cache_dir: Path, uris: tuple[str, ...]) -> None:
    """Keep these objects resident (fetching them now) until unpinned; survives restarts."""
    _pin_op("pin", cache_dir, uris)


@main.command()
@cache_dir_option
@click.argument("uris", nargs=-1, required=True)
def unpin(cache_dir: Path, uris: tuple[str, ...]) -> None:
    """Let these objects be evicted again (a manifest's pin=1 is changed in the manifest, not here)."""
    _pin_op("unpin", cache_dir, uris)


@main.command()
@cache_dir_option
@click.option("--all", "everything", is_flag=True, help="Every cached file.")
@click.option("--source", is_flag=True, help="Also ask S3 whether each object changed since it was cached.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.argument("uris", nargs=-1)
def verify(cache_dir: Path, everything: bool, source: bool, as_json: bool, uris: tuple[str, ...]) -> None:
    """Re-hash cached files against their recorded checksum (and with --source, check S3 for changes).

    A file that no longer matches is moved to .s3cache/quarantine (never deleted silently) and fetched
    again; the command then exits 1. Objects changed in S3 are fetched again.
    """
    if not everything and not uris:
        raise click.UsageError("name URIs to verify, or --all")
    report = _run(_request, cache_dir, {"op": "verify", "uris": _run(_check_uris, uris), "all": everything,
                                        "source": source}, timeout=None)["report"]
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(f"checked {report['checked']} file(s): {report['ok']} ok, {len(report['mismatched'])} "
                   f"corrupt, {len(report['changed'])} changed in S3, {len(report['gone'])} gone from S3")
        for m in report["mismatched"]:
            if m.get("quarantined"):
                click.echo(f"corrupt     {_shown(m['uri'])} ({m['path']}): quarantined at {m['quarantined']}, fetching again")
            else:  # it could not be moved aside: it was removed instead, or is still there and not served
                click.echo(f"corrupt     {_shown(m['uri'])} ({m['path']}): not quarantined ({m.get('error', 'unknown error')})")
        for c in report["changed"]:
            click.echo(f"changed     {_shown(c['uri'])}: ETag {c['was']} -> {c['etag']}, fetching again")
        for g in report["gone"]:
            click.echo(f"gone        {_shown(g['uri'])}: {g['code']}")
        for u in report["not_cached"]:
            click.echo(f"not cached  {_shown(u)}")
    if report["mismatched"]:
        sys.exit(1)


@main.command("manifest")
@click.argument("uri")
@click.option("--pattern", help="Only keys matching this shell pattern after the prefix (e.g. '*.tfrecord'; "
              "'*' matches across '/').")
@click.option("--checksums", is_flag=True,
              help="Also write the checksums S3 stores for each object (one HeadObject an object).")
@click.option("--endpoint-url", envvar=["S3CACHE_ENDPOINT_URL", "AWS_ENDPOINT_URL"],
              help="S3 endpoint (for S3-compatible stores and tests).")
@click.option("--region", envvar="AWS_REGION", help="AWS region (default: boto3's configuration).")
def manifest_cmd(uri: str, pattern: str | None, checksums: bool, endpoint_url: str | None,
                 region: str | None) -> None:
    """Write a manifest of every object under s3://BUCKET/PREFIX/ to stdout, in key order, with sizes."""
    from .listing import make_client, parse_prefix_uri, write_manifest

    bucket, prefix = _run(parse_prefix_uri, uri)
    n, skipped = _run(write_manifest, make_client(endpoint_url, region), bucket, prefix, sys.stdout,
                      pattern=pattern, checksums=checksums)
    for uri_shown, why in skipped.items:
        click.echo(f"s3cache: skipped {uri_shown}: {why}", err=True)
    note = f", {skipped.count} skipped (keys the daemon would refuse)" if skipped.count else ""
    click.echo(f"s3cache: {n} object(s) under s3://{bucket}/{prefix}{note}", err=True)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the demo's cache and data (default: a temporary directory).")
@click.option("--shards", type=int, default=16, show_default=True)
@click.option("--records", type=int, default=4096, show_default=True, help="Records per shard.")
@click.option("--images", type=int, default=0, show_default=True,
              help="Also run an image pipeline over this many small JPEG objects.")
def demo(workdir: Path | None, shards: int, records: int, images: int) -> None:
    """Run the whole path on an embedded S3 (moto): upload TFRecords, serve, read back, train a step."""
    from .testing.demo import run_demo

    sys.exit(_run(run_demo, workdir=workdir, shards=shards, records=records, out=click.echo, images=images))


if __name__ == "__main__":
    main()
