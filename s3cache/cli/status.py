"""``s3cache status``: what the daemon is doing, once (text or JSON) or redrawn live with ``--watch``.

Reads only the daemon's ``status`` reply (fields in docs/operating.md); never the cache dir itself.

``--ready`` is the readiness check (a probe's): exit 0 only while the daemon serves; ``EXIT_STARTING``
and one line on stderr naming the step while it starts; ``DaemonNotRunning``'s exit (1) and its line
when no daemon answers. A starting daemon is alive (``status`` and ``--json`` exit 0) but not ready.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from s3cache.service.progress import plain_lines

from .common import cache_dir_option, main, request, run

EXIT_STARTING = 3  # --ready while the daemon starts: alive, not ready (1 is "no daemon", 2 bad input)


@main.command()
@cache_dir_option
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output (fields in docs/operating.md); with --watch, one JSON object a line.")
@click.option("--watch", is_flag=True, help="Redraw live progress every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.option("--ready", is_flag=True,
              help=f"Readiness check: exit 0 only while the daemon serves; {EXIT_STARTING} while it starts, 1 "
                   "without a daemon, each with one line saying why (a readiness probe's command).")
def status(cache_dir: Path, as_json: bool, watch: bool, interval: float, ready: bool) -> None:
    """What the daemon is doing: objects by state, bytes against the maximum, throughput, failures."""
    if ready:
        if watch:
            raise click.UsageError("--ready answers once; it does not go with --watch")
        sys.exit(_ready(cache_dir, as_json))
    if watch:
        run(_watch, cache_dir, as_json, interval)
        return
    st = run(request, cache_dir, {"op": "status"})["status"]
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    for line in plain_lines(st):
        click.echo(line)


def _ready(cache_dir: Path, as_json: bool) -> int:
    """The exit code of ``status --ready`` (see the module doc), after its one line (or ``--json``'s
    status, whichever the state)."""
    st = run(request, cache_dir, {"op": "status"}, timeout=30.0)["status"]
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
    if st.get("state") == "starting":
        progress = f"; {st['progress']}" if st.get("progress") else ""
        click.echo(f"s3cache: not ready: the daemon (pid {st.get('pid')}) is starting: {st.get('step')} "
                   f"({st.get('seconds', 0):.0f}s so far{progress})", err=True)
        return EXIT_STARTING
    if not as_json:
        click.echo(f"ready: serving {st.get('cache_dir')} (pid {st.get('pid')})")
    return 0


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

