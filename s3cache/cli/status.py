"""``s3cache status``: what the daemon is doing, once (text or JSON) or redrawn live with ``--watch``.

Reads only the daemon's ``status`` reply (fields in the README); never the cache dir itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from s3cache.manifest.refs import printable, shown
from s3cache.service.config import human_size
from s3cache.service.progress import jobs

from .common import cache_dir_option, main, request, run


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
        run(_watch, cache_dir, as_json, interval)
        return
    st = run(request, cache_dir, {"op": "status"})["status"]
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    if st.get("state") == "starting":
        click.echo(f"cache dir   {st['cache_dir']} (daemon pid {st['pid']}, up {st['uptime']:.0f}s)")
        click.echo(f"starting    {st['step']} ({st['seconds']:.0f}s so far)"
                   + (f": {st['progress']}" if st["progress"] else ""))
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
    for name, _, line in jobs(st):
        click.echo(f"job {name:<7} {line}")
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

    from s3cache.service.progress import render

    console = Console(file=sys.stdout)
    try:
        if as_json:
            while True:
                click.echo(json.dumps(request(cache_dir, {"op": "status"})["status"], sort_keys=True))
                time.sleep(interval)
        if not console.is_terminal:
            while True:
                console.print(render(request(cache_dir, {"op": "status"})["status"]))
                console.print()
                console.file.flush()
                time.sleep(interval)
        with Live(render(request(cache_dir, {"op": "status"})["status"]), console=console,
                  auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(request(cache_dir, {"op": "status"})["status"]), refresh=True)
    except KeyboardInterrupt:
        return

