"""``s3cache manifest``: write a manifest of every object under a prefix (the listing is ``listing``).

Invariant: the manifest goes to stdout and nothing else does; skipped keys and the count go to stderr.
"""

from __future__ import annotations

import sys

import click

from .common import main, run


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
    from s3cache.fetch.listing import make_client, parse_prefix_uri, write_manifest

    bucket, prefix = run(parse_prefix_uri, uri)
    n, skipped = run(write_manifest, make_client(endpoint_url, region), bucket, prefix, sys.stdout,
                      pattern=pattern, checksums=checksums)
    for uri_shown, why in skipped.items:
        click.echo(f"s3cache: skipped {uri_shown}: {why}", err=True)
    note = f", {skipped.count} skipped (keys the daemon would refuse)" if skipped.count else ""
    click.echo(f"s3cache: {n} object(s) under s3://{bucket}/{prefix}{note}", err=True)
