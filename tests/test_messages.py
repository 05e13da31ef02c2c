"""Errors name their object once (issue 19): a failure is reported beside its URI, so its message does
not repeat it ("failed s3://x: ChecksumMismatch: s3://x: ..." said it twice)."""

from __future__ import annotations

import hashlib

import pytest
from conftest import write_manifest

from s3cache import resolve
from s3cache.errors import S3CacheError


def test_a_failure_names_its_object_once_in_status_and_the_log(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"real bytes")
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    uri = f"s3://{bucket}/k"
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"{uri} sha256={wrong}"]))
    st = d.wait_until(lambda st: st["objects"]["failed"] == 1, what="the wrong checksum to fail")
    (f,) = st["failures"]
    assert f["uri"] == uri and f["code"] in ("ChecksumMismatch", "WrongChecksum")
    assert uri not in f["message"] and wrong in f["message"], f
    line = next(x for x in d.log().splitlines() if "ERROR" in x and "failed" in x)
    assert line.count(uri) == 1, line
    with pytest.raises(S3CacheError) as ei:
        resolve(uri, cache_dir=d.cache_dir, timeout=60)
    assert str(ei.value).count(uri) == 1, str(ei.value)


def test_a_digest_given_in_base64_is_named_in_base64_too(tmp_path, s3, bucket, daemons):
    """Issue 19: an md5 given in base64 (as S3 prints it) was reported only in hex."""
    import base64

    s3.put_object(Bucket=bucket, Key="k", Body=b"real bytes")
    wrong = base64.b64encode(hashlib.md5(b"other bytes").digest()).decode()
    uri = f"s3://{bucket}/k"
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [f"{uri} md5={wrong}"]))
    st = d.wait_until(lambda st: st["objects"]["failed"] == 1, what="the wrong md5 to fail")
    msg = st["failures"][0]["message"]
    assert f"(base64 {wrong})" in msg and hashlib.md5(b"other bytes").hexdigest() in msg, msg
