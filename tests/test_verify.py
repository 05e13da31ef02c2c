"""`s3cache verify` and `serve --revalidate`: corrupt files are quarantined, changed objects refetched."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner
from conftest import write_manifest

from s3cache import resolve
from s3cache.cli import main
from s3cache.testing import wait_for


def setup(tmp_path, s3, bucket, daemons, n=4, args=()):
    data = {}
    for i in range(n):
        body = os.urandom(40_000)
        s3.put_object(Bucket=bucket, Key=f"v/{i}", Body=body)
        data[f"s3://{bucket}/v/{i}"] = body
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", list(data)), args=list(args))
    d.wait_until(lambda st: st["objects"]["ready"] == n)
    return d, data


def test_verify_quarantines_a_corrupt_file_and_fetches_it_again(tmp_path, s3, bucket, daemons):
    d, data = setup(tmp_path, s3, bucket, daemons)
    victim = list(data)[1]
    path = Path(resolve(victim, cache_dir=d.cache_dir))
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x10  # bit rot on the SSD
    path.write_bytes(bytes(raw))
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--all", "--json"])
    assert r.exit_code == 1
    report = json.loads(r.output)
    assert report["checked"] == 4 and report["ok"] == 3
    [bad] = report["mismatched"]
    assert bad["uri"] == victim
    quarantined = Path(bad["quarantined"])
    assert quarantined.parent == d.cache_dir.absolute() / ".s3cache" / "quarantine"
    assert quarantined.read_bytes() == bytes(raw)  # kept for inspection, out of readers' reach
    wait_for(lambda: path.exists() and path.read_bytes() == data[victim], 120, "the object to be fetched again")
    # The file is visible once renamed; the daemon marks it ready after the fsyncs and the index row
    # (verify checks ready files): under load that comes a moment later.
    d.wait_until(lambda st: st["objects"]["ready"] == 4, what="the fetched-again object ready")
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--all"])
    assert r.exit_code == 0 and "4 ok, 0 corrupt" in r.output


def test_verify_source_refetches_objects_changed_in_s3(tmp_path, s3, bucket, daemons):
    d, data = setup(tmp_path, s3, bucket, daemons)
    uri = list(data)[0]
    s3.put_object(Bucket=bucket, Key="v/0", Body=b"new contents")
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", uri])
    assert r.exit_code == 0, r.output
    assert "1 changed in S3" in r.output
    path = d.cache_dir / bucket / "v" / "0"
    wait_for(lambda: path.exists() and path.read_bytes() == b"new contents", 120, "the new version")
    # visible once renamed over the old one; its record is the new version only once published
    d.wait_until(lambda st: st["fetched"] == 5, what="the new version published")
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", "--all"])
    assert r.exit_code == 0, r.output
    assert "4 ok" in r.output and "0 changed" in r.output


def test_serve_revalidate_notices_changes_by_itself(tmp_path, s3, bucket, daemons):
    d, data = setup(tmp_path, s3, bucket, daemons, args=["--revalidate", "0.5"])
    s3.put_object(Bucket=bucket, Key="v/3", Body=b"v2")
    path = d.cache_dir / bucket / "v" / "3"
    wait_for(lambda: path.exists() and path.read_bytes() == b"v2", 120, "revalidation to pick up v2")


def test_verify_needs_a_target(tmp_path):
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--all" in r.output


def test_verify_source_spends_one_head_per_object_and_keeps_going_past_a_bad_answer(tmp_path, s3, bucket, daemons,
                                                                                    proxy):
    data = {}
    for i in range(12):
        key, body = f"v/{i:02d}", os.urandom(3000 + i)
        if i % 3 == 0:  # 4 of them uploaded in (one) part: their ETag is a multipart one
            mpu = s3.create_multipart_upload(Bucket=bucket, Key=key)
            part = s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1, Body=body)
            s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                         MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        data[f"s3://{bucket}/{key}"] = body
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", list(data)), args=["--endpoint-url", proxy.url])
    d.wait_until(lambda st: st["objects"]["ready"] == 12)
    changed = [u for i, u in enumerate(data) if i % 3]
    for uri in changed:
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=b"new " + uri.encode())
    # A server that ignores partNumber: part HEADs come back with no part count (BadResponse, once).
    proxy.plan = lambda m, p, q: "no-parts-count" if m == "HEAD" and "partNumber" in q else None
    heads = len(proxy.seen(f"/{bucket}/", "HEAD"))
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", "--all", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert len(proxy.seen(f"/{bucket}/", "HEAD")) - heads == 12  # one per object, none for part sizes
    assert sorted(c["uri"] for c in report["changed"]) == sorted(changed) and report["ok"] == 4
    for uri in changed:
        path = d.cache_dir / bucket / uri.split("/", 3)[3]
        wait_for(lambda: path.read_bytes() == b"new " + uri.encode(), 120, f"{uri} fetched again")


def test_verify_text_output_names_an_object_s3_gave_no_usable_answer_about(tmp_path, s3, bucket, daemons, proxy):
    """The text form prints what --json lists under errors: one line per object left unchecked."""
    for key in ("e/ok", "e/odd"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode() * 100)
    uris = [f"s3://{bucket}/e/ok", f"s3://{bucket}/e/odd"]
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris), args=["--endpoint-url", proxy.url])
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    proxy.plan = lambda m, p, q: "500" if m == "HEAD" and p.endswith("/e/odd") else None
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", "--all"])
    assert r.exit_code == 0, r.output
    assert f"unchecked   s3://{bucket}/e/odd: " in r.output, r.output
    assert "checked 2 file(s)" in r.output and f"s3://{bucket}/e/ok" not in r.output.split("unchecked", 1)[1]


def test_revalidate_asks_no_more_about_an_object_whose_refetch_is_pending(tmp_path, s3, bucket, moto, daemons):
    """An object found changed is marked superseded and fetched again; until its new version lands the
    next cycles must not HEAD it again (they did: one HEAD per cycle, for nothing). The refetch is held
    by the proxy; cycles are counted by the HEADs of an object that did not change."""
    from s3cache.testing.faultproxy import FaultProxy

    for i in range(2):
        s3.put_object(Bucket=bucket, Key=f"p/{i}", Body=os.urandom(40_000))
    hold = []
    plan = lambda m, p, q: "stall" if hold and m == "GET" and p.endswith("/p/1") else None
    with FaultProxy(moto.port, plan, stall_seconds=600) as proxy:
        try:
            d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/p/{i}" for i in range(2)]),
                        args=["--endpoint-url", proxy.url, "--revalidate", "0.2", "--read-timeout", "600",
                              "--max-attempts", "1"])
            d.wait_until(lambda st: st["objects"]["ready"] == 2)
            hold.append(True)
            s3.put_object(Bucket=bucket, Key="p/1", Body=b"v2")
            heads = lambda key: len(proxy.seen(f"/{bucket}/{key}", "HEAD"))
            wait_for(lambda: any(x.fault == "stall" for x in proxy.seen(f"/{bucket}/p/1", "GET")), 120,
                     "the refetch of p/1 to be held")
            changed, unchanged = heads("p/1"), heads("p/0")
            wait_for(lambda: heads("p/0") >= unchanged + 3, 120, "three more revalidation cycles")
            assert heads("p/1") == changed
            assert d.stop() == 0  # stopping ends the held GET; then the proxy may end it too
        finally:
            proxy.release.set()
