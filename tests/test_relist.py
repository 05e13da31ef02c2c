"""A prefix line that could not be listed is listed again, with backoff and visibly (issue 26.2): its
bucket cannot be listed while the daemon starts, can be later, and the prefix's objects join the manifest
(a ``pin=1`` prefix pinned) with no edit and no SIGHUP; meanwhile status names the failure and the retry."""

from __future__ import annotations

import uuid

from conftest import write_manifest


def test_a_prefix_that_failed_to_list_at_start_is_listed_again(tmp_path, s3, bucket, daemons):
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode() * 10)
    later = "t-" + uuid.uuid4().hex[:16]  # not there yet: listing it fails (NoSuchBucket)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a", f"s3://{bucket}/b", f"s3://{later}/p/ pin=1"])
    d = daemons(manifest=m)
    st = d.wait_until(lambda st: st["objects"]["ready"] == 2, what="the two listed objects")
    assert st["manifest_entries"] == 2
    assert len(st["manifest_errors"]) == 1 and f"cannot list s3://{later}/p/" in st["manifest_errors"][0]
    assert "listing again in" in st["manifest_errors"][0]
    assert "listing again in" in d.log()

    s3.create_bucket(Bucket=later)  # the bucket can be listed now: no edit, no SIGHUP
    for k in ("p/0", "p/1", "p/2"):
        s3.put_object(Bucket=later, Key=k, Body=k.encode() * 10)
    st = d.wait_until(lambda st: st["manifest_entries"] == 5 and st["objects"]["ready"] == 5, timeout=90,
                      what="the prefix listed again and fetched")
    assert st["manifest_errors"] == []
    assert st["pinned"]["files"] == 3 and st["pinned"]["objects"] == 3  # the validation prefix, pinned
    assert "every prefix line listed" in d.log()
