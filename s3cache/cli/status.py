"""``s3cache status``: what the daemon is doing, once (text or JSON) or redrawn live with ``--watch``.

Reads only the daemon's ``status`` reply (fields in docs/operating.md); never the cache dir itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from s3cache.service.progress import plain_lines

from .common import cache_dir_option, main, request, run


@main.command()
@cache_dir_option
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output (fields in docs/operating.md); with --watch, one JSON object a line.")
@click.option("--watch", is_flag=True, help="Redraw live progress every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between redraws with --watch.")
def status(cache_dir: Path, as_json: bool, watch: bool, interval: float) -> None:
    """What the daemon is doing: objects by state, bytes against the maximum, throughput, failures."""
    if watch:
        run(_watch, cache_dir, as_json, interval)
        return
    st = run(request, cache_dir, {"op": "status"})["status"]
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    for line in plain_lines(st):
        click.echo(line)


def _watch(cache_dir: Path, as_json: bool, interval: float) -> None:
    """Fetch status and redraw until Ctrl-C: in place on a terminal, one frame after another otherwise
    (a log or a pipe gets plain text, no cursor movement)."""
    import time

    from rich.console import Console
    from rich.live import Live

    from s3cache.service.progress import render

    console = Console(file=sys.stdout)
    try:
        if as_json:
            while True:
                click.echo(json.dumps(request(cache_dir, {"op": "status"})["status"], sort_keys=True))
                time.sleep(interval)
        if not console.is_terminal:  # a pipe or a log: plain lines, never wrapped to 80 columns or bars
            while True:
                for line in plain_lines(request(cache_dir, {"op": "status"})["status"]):
                    click.echo(line)
                click.echo("", nl=True)
                sys.stdout.flush()
                time.sleep(interval)
        with Live(render(request(cache_dir, {"op": "status"})["status"]), console=console,
                  auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(request(cache_dir, {"op": "status"})["status"]), refresh=True)
    except KeyboardInterrupt:
        return

