"""The ``s3cache`` command: a thin click shell over the library.

Every S3CacheError becomes one line on stderr and its exit code (2 for bad input, 1 otherwise); only a
bug prints a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import Kind, Option, default_cache_dir, human_size, options
from .config_sources import CONFIG_ENV, DEFAULT_CONFIG, Effective, load
from .errors import ConfigError, S3CacheError


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except S3CacheError as e:
        click.echo(f"s3cache: error: {e}", err=True)
        sys.exit(e.exit_code)


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
    """Run the daemon in the foreground (systemd runs it): prefetch, verify, serve readers."""
    from .daemon import Daemon

    settings = _effective(config_file, given).settings
    logging.basicConfig(level=getattr(logging, settings.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # boto's own loggers would print request details (and with debug, signed headers): keep them quiet.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(_run(Daemon(settings).run))


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
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.argument("uris", nargs=-1, required=True)
def resolve_cmd(cache_dir: Path, timeout: float | None, uris: tuple[str, ...]) -> None:
    """Print the local path of each URI, one a line, waiting until each file has landed."""
    from .resolve import resolve

    for p in _run(resolve, list(uris), cache_dir=cache_dir, timeout=timeout):
        click.echo(p)


def _request(cache_dir: Path, msg: dict, timeout: float | None = 60.0) -> dict:
    from .control import Client
    from .store import Layout

    with Client(Layout(str(cache_dir.absolute())).control_socket, str(cache_dir), timeout=timeout) as c:
        return c.request(msg)


@main.command()
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(cache_dir: Path, as_json: bool) -> None:
    """What the daemon is doing: objects by state, bytes against the maximum, throughput, failures."""
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
        click.echo(f"failed      {f['uri']}: {f['code']}")
    for e in st.get("manifest_errors", []):
        click.echo(f"manifest    {e}")


@main.command()
@cache_dir_option
@click.argument("uris", nargs=-1, required=True)
def pin(cache_dir: Path, uris: tuple[str, ...]) -> None:
    """Keep these objects resident (fetching them now) until unpinned; survives restarts."""
    reply = _run(_request, cache_dir, {"op": "pin", "uris": list(uris)})
    click.echo(f"pinned {len(uris)} object(s); {reply['pinned']} pinned in all")


@main.command()
@cache_dir_option
@click.argument("uris", nargs=-1, required=True)
def unpin(cache_dir: Path, uris: tuple[str, ...]) -> None:
    """Let these objects be evicted again."""
    reply = _run(_request, cache_dir, {"op": "unpin", "uris": list(uris)})
    click.echo(f"unpinned {len(uris)} object(s); {reply['pinned']} pinned in all")


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
    report = _run(_request, cache_dir, {"op": "verify", "uris": list(uris), "all": everything, "source": source},
                  timeout=None)["report"]
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(f"checked {report['checked']} file(s): {report['ok']} ok, {len(report['mismatched'])} "
                   f"corrupt, {len(report['changed'])} changed in S3, {len(report['gone'])} gone from S3")
        for m in report["mismatched"]:
            click.echo(f"corrupt     {m['uri']} ({m['path']}): quarantined at {m['quarantined']}, fetching again")
        for c in report["changed"]:
            click.echo(f"changed     {c['uri']}: ETag {c['was']} -> {c['etag']}, fetching again")
        for g in report["gone"]:
            click.echo(f"gone        {g['uri']}: {g['code']}")
        for u in report["not_cached"]:
            click.echo(f"not cached  {u}")
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
