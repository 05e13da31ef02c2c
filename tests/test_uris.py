"""Issue 19, one meaning for a URI: keys are percent-decoded as in the manifest at every entry point
(manifest, resolve(), s3cache resolve/pin/verify), the daemon and the wire keep the raw key (the
identity), and status prints the manifest's form, so a URI copied from any of them names one object."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from s3cache import FetchFailed, resolve
from s3cache.cli import main
from s3cache.errors import UnsafeKey
from s3cache.fetch.listing import write_manifest as list_manifest
from s3cache.manifest.parse import parse_line
from s3cache.manifest.refs import (
    ObjectRef,
    decode_key,
    encode_key,
    format_uri,
    from_identity,
    parse_uri,
)

# raw keys (what S3 stores, what `aws s3 ls` prints); "x%41" is the one the rule cannot take raw
KEYS = ["u/a b#c.bin", "u/100%.bin", "u/x%41.bin", "u/p+q.bin", "u/Ünï ñ.bin", "u/plain.bin", "u/%zz.bin"]


def test_display_and_identity_round_trip_and_nothing_decodes_twice():
    for key in KEYS:
        ref = ObjectRef("bkt", key)
        assert parse_uri(ref.display) == ref  # what status prints resolves the same object
        assert from_identity(ref.uri) == ref  # the identity is never decoded again
        assert parse_line(ref.display).ref == ref  # ... and the manifest reads it the same way
    assert parse_uri("s3://bkt/x%41.bin").key == "xA.bin"  # %XX is a byte, as in the manifest
    assert parse_uri("s3://bkt/50%off").key == "50%off"  # a '%' not before two hex digits is itself
    assert parse_uri("s3://bkt/a+b").key == "a+b"  # not form encoding
    with pytest.raises(UnsafeKey, match="not valid UTF-8"):
        parse_uri("s3://bkt/%ff")


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40))
def test_any_key_survives_display_then_parse(key):
    assert decode_key(encode_key(key)) == key
    assert parse_uri(format_uri(ObjectRef("bkt", key))).key == key


def test_manifest_raw_status_and_cli_forms_resolve_the_same_object(tmp_path, s3, bucket, daemons):
    bodies = {k: f"body of {k}".encode() for k in KEYS}
    bodies["u/xA.bin"] = b"the object the raw form x%41 decodes to"
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    out = io.StringIO()
    list_manifest(s3, bucket, "u/", out)  # what `s3cache manifest` writes
    m = tmp_path / "m.txt"
    m.write_text(out.getvalue() + f"s3://{bucket}/{encode_key('u/gone%41 #1')}\n")
    d = daemons(manifest=m)
    kw = {"cache_dir": d.cache_dir, "timeout": 120}
    manifest_forms = [line.split()[0] for line in out.getvalue().splitlines()]
    by_key = {parse_line(line).ref.key: line.split()[0] for line in out.getvalue().splitlines()}
    for form in manifest_forms:
        key = parse_line(form).ref.key
        assert open(resolve(form, **kw), "rb").read() == bodies[key], form
    for key in KEYS:  # raw, as `aws s3 ls` prints: the same object unless the key has %XX in it
        got = open(resolve(f"s3://{bucket}/{key}", **kw), "rb").read()
        assert got == (bodies["u/xA.bin"] if key == "u/x%41.bin" else bodies[key]), key
    # a failure in status names the object in the manifest's form; resolving that names the same one
    with pytest.raises(FetchFailed) as e:
        resolve(f"s3://{bucket}/{encode_key('u/gone%41 #1')}", **kw)
    failures = d.status()["failures"]
    assert [f["uri"] for f in failures] == [e.value.uri] == [f"s3://{bucket}/u/gone%2541%20%231"]
    with pytest.raises(FetchFailed) as again:
        resolve(failures[0]["uri"], **kw)
    assert again.value.uri == e.value.uri and len(d.status()["failures"]) == 1  # no second, typo'd object
    # the CLI: resolve, pin and verify take the same form and print it back
    runner = CliRunner()
    r = runner.invoke(main, ["resolve", "--cache-dir", str(d.cache_dir), "--timeout", "120", by_key["u/x%41.bin"]])
    assert r.exit_code == 0 and open(r.stdout.strip(), "rb").read() == bodies["u/x%41.bin"], r.output
    r = runner.invoke(main, ["pin", "--cache-dir", str(d.cache_dir), by_key["u/a b#c.bin"]])
    assert r.exit_code == 0 and d.status()["pinned"]["files"] == 1, r.output
    r = runner.invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--json", by_key["u/x%41.bin"],
                             by_key["u/100%.bin"]])
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["checked"] == 2 and report["not_cached"] == [], r.output
