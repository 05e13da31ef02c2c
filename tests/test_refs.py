"""Bucket names: S3's naming rules, checked locally wherever a URI is parsed (issue 19)."""

import pytest
from click.testing import CliRunner

from s3cache.cli import main
from s3cache.errors import ManifestError, UnsafeKey
from s3cache.manifest.parse import parse
from s3cache.manifest.refs import check_bucket, parse_uri

BAD = [
    ("Bad_Bucket", "lower-case letters"),
    ("UPPER", "lower-case letters"),
    ("ab", "3 to 63"),
    ("a" * 64, "3 to 63"),
    ("-start", "begin and end"),
    ("end-", "begin and end"),
    ("end.", "begin and end"),
    (".dot", "begin and end"),
    ("two..dots", "adjacent dots"),
    ("192.168.5.4", "IP address"),
    ("xn--bucket", "reserved"),
    ("sthree-b", "reserved"),
    ("b-s3alias", "reserved"),
    ("sp ace", "lower-case letters"),
]
GOOD = ["abc", "my-bucket", "my.bucket.name", "a" * 63, "0bucket9", "b1k", "192.168.5", "zone--use1-az4--x-s3"]


@pytest.mark.parametrize("name,why", BAD)
def test_invalid_bucket_names_are_refused_with_the_rule(name, why):
    with pytest.raises(UnsafeKey) as ei:
        check_bucket(name)
    assert repr(name) in str(ei.value) and why in str(ei.value)
    with pytest.raises(UnsafeKey):
        parse_uri(f"s3://{name}/k")


@pytest.mark.parametrize("name", GOOD)
def test_valid_bucket_names_pass(name):
    assert check_bucket(name) == name
    assert parse_uri(f"s3://{name}/k").bucket == name


def test_manifest_line_with_invalid_bucket_names_file_and_line():
    with pytest.raises(ManifestError) as ei:
        list(parse(["s3://good-bucket/k", "s3://Bad_Bucket/k"], "m.txt"))
    assert str(ei.value).startswith("m.txt:2: invalid bucket name 'Bad_Bucket'")


def test_cli_resolve_refuses_invalid_bucket_locally(tmp_path):
    # No daemon serves this cache dir: an error about the bucket proves nothing was asked of S3 or a daemon.
    r = CliRunner().invoke(main, ["resolve", "--cache-dir", str(tmp_path), "--timeout", "1", "s3://Bad_Bucket/k"])
    assert r.exit_code != 0
    assert "invalid bucket name 'Bad_Bucket'" in r.output
    assert "no s3cache daemon" not in r.output
