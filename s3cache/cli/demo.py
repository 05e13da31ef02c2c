"""``s3cache demo``: the whole path on an embedded S3 (moto).

The one command that runs the test harness (``s3cache.testing``), imported inside the command only, so
``serve`` and every other command never load it (the import contracts check this).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import main, run


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the demo's cache and data (default: a temporary directory).")
@click.option("--shards", type=int, default=16, show_default=True)
@click.option("--records", type=int, default=4096, show_default=True, help="Records per shard.")
@click.option("--images", type=int, default=0, show_default=True,
              help="Also run an image pipeline over this many small JPEG objects.")
def demo(workdir: Path | None, shards: int, records: int, images: int) -> None:
    """Run the whole path on an embedded S3 (moto): upload TFRecords, serve, read back, train a step."""
    from ..testing.demo import run_demo

    sys.exit(run(run_demo, workdir=workdir, shards=shards, records=records, out=click.echo, images=images))
