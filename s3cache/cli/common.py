"""What every command shares: the ``main`` group, exit codes, the ``--cache-dir`` option, the daemon's socket.

Invariant: every S3CacheError becomes one line on stderr (``s3cache: error: ...``) and its exit code
here (``run``, ``EXIT_CODES``): 2 for bad input, as click's usage errors, 1 otherwise; only a bug
prints a traceback. The command groups (serve, status, objects, manifest, demo) add their commands to
``main`` when the package is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from s3cache.service.config import default_cache_dir

from ..errors import ConfigError, ManifestError, S3CacheError, UnsafeKey
from ..version import __version__

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


def run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except S3CacheError as e:
        click.echo(f"s3cache: error: {e}", err=True)
        sys.exit(exit_code(e))


cache_dir_option = click.option(
    # readable=False: a dir this user may not read gets our error, which names the group to join
    "--cache-dir", type=click.Path(file_okay=False, readable=False, path_type=Path), envvar="S3CACHE_DIR",
    default=default_cache_dir, show_default="$S3CACHE_DIR or /var/cache/s3cache",
    help="The cache directory.")


@click.group()
@click.version_option(__version__, prog_name="s3cache")
def main() -> None:
    """Prefetch S3 objects into a verified local cache; training jobs read plain local files."""



def request(cache_dir: Path, msg: dict, timeout: float | None = 60.0) -> dict:
    from s3cache.sockets.control import Client
    from s3cache.store.layout import Layout

    with Client(Layout(str(cache_dir.absolute())).control_socket, str(cache_dir), timeout=timeout) as c:
        return c.request(msg)


def shown_uri(identity: str) -> str:
    """A URI from the daemon (an identity, refs.py) as users write it: percent-encoded as in a manifest."""
    from s3cache.manifest.refs import format_uri

    try:
        return format_uri(identity)
    except S3CacheError:
        return identity


def check_uris(uris: tuple[str, ...]) -> list[str]:
    """The URIs as the daemon names them; raises UnsafeKey (exit 2) for the first malformed one, before
    anything is sent, so a typo changes nothing."""
    from s3cache.manifest.refs import parse_uri

    return [parse_uri(u).uri for u in uris]
