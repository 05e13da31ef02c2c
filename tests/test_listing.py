"""`s3cache manifest s3://bucket/prefix/` (issue 13.5) against moto's S3 server."""

import base64
import hashlib
import io
import uuid

import pytest
from click.testing import CliRunner

from s3cache.cli import main
from s3cache.errors import FetchFailed, UnsafeKey
from s3cache.fetch.listing import (
    make_client,
    manifest_lines,
    parse_prefix_uri,
    write_manifest,
)
from s3cache.manifest.parse import parse

KEYS = ["p/a b.tfrecord", "p/hash#1.tfrecord", "p/100%.tfrecord", "p/caf\u00e9/\u6570\u636e.tfrecord",
        "p/plus+and?q=1&x.tfrecord", "p/z/last.txt", "p/tab\there.tfrecord"]


def run(moto, *args):
    return CliRunner().invoke(main, ["manifest", *args, "--endpoint-url", moto.url])


def test_lines_round_trip_through_the_parser_in_key_order_across_pages(moto, s3, bucket):
    for i, k in enumerate(KEYS):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x" * i)
    s3.put_object(Bucket=bucket, Key="p/folder/", Body=b"")  # a folder marker: no data, no line
    s3.put_object(Bucket=bucket, Key="q/other", Body=b"")  # outside the prefix
    lines = list(manifest_lines(make_client(moto.url, "us-east-1"), bucket, "p/", page_size=2))
    got = list(parse(lines, "m.txt"))
    assert [(e.ref.bucket, e.ref.key) for e in got] == [(bucket, k) for k in sorted(KEYS)]
    assert [e.size for e in got] == [KEYS.index(e.ref.key) for e in got]
    assert not any(e.size_is_hint for e in got)  # a written manifest states its sizes
    assert all(" " not in ln.split(" ", 1)[0][5:] and "#" not in ln for ln in lines)


def test_cli_writes_the_manifest_to_stdout_and_a_summary_to_stderr(moto, s3, bucket):
    for k in KEYS:
        s3.put_object(Bucket=bucket, Key=k, Body=b"data")
    r = run(moto, f"s3://{bucket}/p/", "--pattern", "*.tfrecord")
    assert r.exit_code == 0, r.stderr
    keys = [e.ref.key for e in parse(r.stdout.splitlines(), "-")]
    assert keys == sorted(k for k in KEYS if k.endswith(".tfrecord"))
    assert f"6 object(s) under s3://{bucket}/p/" in r.stderr


def test_keys_the_daemon_would_refuse_are_skipped_with_a_warning(moto, s3, bucket):
    for k in ["p/ok", "p/" + "x" * 1100, "p/nul\x00key"]:
        s3.put_object(Bucket=bucket, Key=k, Body=b"abc")
    r = run(moto, f"s3://{bucket}/p/")
    assert r.exit_code == 0, r.stderr
    assert [e.ref.key for e in parse(r.stdout.splitlines(), "-")] == ["p/ok"]
    assert "2 skipped" in r.stderr and "S3 allows at most 1024" in r.stderr and "NUL" in r.stderr


def test_checksums_are_written_only_when_they_are_the_bytes_checksums(moto, bucket):
    s3 = moto.client()  # uploads with additional checksums
    body = b"abcd" * 1000
    s3.put_object(Bucket=bucket, Key="c/crc", Body=body, ChecksumAlgorithm="CRC32C")
    s3.put_object(Bucket=bucket, Key="c/sha", Body=body, ChecksumAlgorithm="SHA256")
    mp = s3.create_multipart_upload(Bucket=bucket, Key="c/multi")
    part = s3.upload_part(Bucket=bucket, Key="c/multi", UploadId=mp["UploadId"], PartNumber=1, Body=body)
    s3.complete_multipart_upload(Bucket=bucket, Key="c/multi", UploadId=mp["UploadId"],
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    out = io.StringIO()
    n, _ = write_manifest(make_client(moto.url, "us-east-1"), bucket, "c/", out, checksums=True)
    got = {e.ref.key: e for e in parse(out.getvalue().splitlines(), "-")}
    assert n == 3
    md5 = hashlib.md5(body).hexdigest()
    assert got["c/sha"].sha256 == hashlib.sha256(body).hexdigest() and got["c/sha"].md5 == md5
    assert got["c/crc"].crc32c is not None and got["c/crc"].md5 == md5
    assert got["c/multi"].md5 is None  # a multipart ETag is not an MD5 of the bytes
    # Without --checksums, sizes only: a listing says nothing that can be trusted as a checksum.
    plain = list(parse(manifest_lines(make_client(moto.url, "us-east-1"), bucket, "c/"), "-"))
    assert all(e.md5 is None and e.sha256 is None and e.crc32c is None and e.size == len(body) for e in plain)


def test_no_such_bucket_is_one_line_and_non_zero(moto):
    name = "nope-" + uuid.uuid4().hex[:12]
    r = run(moto, f"s3://{name}/p/")
    assert r.exit_code != 0
    assert r.stdout == ""
    assert r.stderr.strip() == f"s3cache: error: s3://{name}/p/: NoSuchBucket: the bucket does not exist"


@pytest.fixture
def denying_endpoint():
    """A real HTTP endpoint that answers every request as S3 does a denied one (moto allows everything)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>")

    class Deny(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    t.join()


def test_access_denied_is_one_line_with_the_code(denying_endpoint):
    with pytest.raises(FetchFailed) as ei:
        write_manifest(make_client(denying_endpoint, "us-east-1"), "some-bucket", "p/", io.StringIO())
    assert ei.value.code == "AccessDenied"
    r = CliRunner().invoke(main, ["manifest", "s3://some-bucket/p/", "--endpoint-url", denying_endpoint])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip() == ("s3cache: error: s3://some-bucket/p/: AccessDenied: the credentials in use may "
                                "not list this bucket")


def test_unreachable_endpoint_is_one_line():
    r = CliRunner().invoke(main, ["manifest", "s3://some-bucket/p/", "--endpoint-url", "http://127.0.0.1:9"])
    assert r.exit_code != 0 and r.stdout == ""
    assert r.stderr.strip() == ("s3cache: error: s3://some-bucket/p/: EndpointUnreachable: cannot reach the "
                                "S3 endpoint http://127.0.0.1:9/some-bucket (EndpointConnectionError)")


@pytest.mark.parametrize("uri,ok", [("s3://bkt/p/", ("bkt", "p/")), ("s3://bkt", ("bkt", "")),
                                    ("s3://bkt/p", ("bkt", "p")), ("s3://Bad_Bucket/p/", None),
                                    ("http://bkt/p/", None)])
def test_prefix_uris(uri, ok):
    if ok:
        assert parse_prefix_uri(uri) == ok
    else:
        with pytest.raises(UnsafeKey):
            parse_prefix_uri(uri)


def test_composite_checksums_are_never_written_as_the_objects(moto, bucket):
    """moto, like servers that predate x-amz-checksum-type, sends a composite CRC32C without "-N" and
    without a type: the fetcher's rule (checks.part_count) reads it as composite, and so must the listing."""
    import crc32c

    s3 = moto.client()
    parts = [b"a" * (5 << 20), b"b" * 1000]
    for key, kind in (("c/composite", {}), ("c/full", {"ChecksumType": "FULL_OBJECT"})):
        mp = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32C", **kind)
        done = []
        for i, p in enumerate(parts, 1):
            r = s3.upload_part(Bucket=bucket, Key=key, UploadId=mp["UploadId"], PartNumber=i, Body=p,
                               ChecksumAlgorithm="CRC32C")
            done.append({"PartNumber": i, "ETag": r["ETag"], "ChecksumCRC32C": r["ChecksumCRC32C"]})
        whole = {"ChecksumCRC32C": base64.b64encode(crc32c.crc32c(b"".join(parts)).to_bytes(4, "big")).decode()}
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mp["UploadId"],
                                     MultipartUpload={"Parts": done}, **(kind and {**kind, **whole}))
    head = s3.head_object(Bucket=bucket, Key="c/composite", ChecksumMode="ENABLED")
    assert "ChecksumType" not in head and "-" not in head["ChecksumCRC32C"]  # the quirk this is about
    out = io.StringIO()
    write_manifest(make_client(moto.url, "us-east-1"), bucket, "c/", out, checksums=True)
    got = {e.ref.key: e for e in parse(out.getvalue().splitlines(), "-")}
    assert got["c/composite"].crc32c is None and got["c/composite"].md5 is None
    assert got["c/full"].crc32c == f"{crc32c.crc32c(b''.join(parts)):08x}"


def test_checksums_include_s3s_and_boto3s_defaults(moto, bucket):
    import zlib

    from awscrt.checksums import crc64nvme

    s3 = moto.client()
    body = b"defaults" * 500
    s3.put_object(Bucket=bucket, Key="d/crc32", Body=body)  # boto3's default: CRC32
    s3.put_object(Bucket=bucket, Key="d/nvme", Body=body, ChecksumAlgorithm="CRC64NVME")  # S3's default
    out = io.StringIO()
    write_manifest(make_client(moto.url, "us-east-1"), bucket, "d/", out, checksums=True)
    got = {e.ref.key: e for e in parse(out.getvalue().splitlines(), "-")}
    assert got["d/crc32"].crc32 == f"{zlib.crc32(body):08x}" and got["d/crc32"].crc64nvme is None
    assert got["d/nvme"].crc64nvme == f"{crc64nvme(body):016x}"


def test_an_encrypted_objects_etag_is_never_written_as_md5(moto, s3, bucket):
    """Under SSE-KMS (and DSSE-KMS) S3's ETag is 32 hex but not the MD5 of the bytes, so ``--checksums``
    must not write it as ``md5=``; the object's additional checksum is written instead when it has one."""
    body = b"secret" * 700
    s3.put_object(Bucket=bucket, Key="e/kms", Body=body, ServerSideEncryption="aws:kms")
    s3.put_object(Bucket=bucket, Key="e/dsse", Body=body, ServerSideEncryption="aws:kms:dsse")
    moto.client().put_object(Bucket=bucket, Key="e/kms-sha", Body=body, ServerSideEncryption="aws:kms",
                             ChecksumAlgorithm="SHA256")
    s3.put_object(Bucket=bucket, Key="e/plain", Body=body)
    head = s3.head_object(Bucket=bucket, Key="e/kms")
    assert head["ServerSideEncryption"] == "aws:kms" and len(head["ETag"].strip('"')) == 32  # what it's about
    r = run(moto, f"s3://{bucket}/e/", "--checksums")
    assert r.exit_code == 0, r.stderr
    got = {e.ref.key: e for e in parse(r.stdout.splitlines(), "-")}
    assert got["e/kms"].md5 is None and got["e/dsse"].md5 is None
    assert got["e/kms-sha"].md5 is None and got["e/kms-sha"].sha256 == hashlib.sha256(body).hexdigest()
    assert got["e/plain"].md5 == hashlib.md5(body).hexdigest()
