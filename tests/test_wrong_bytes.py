"""Never a wrong byte against the answers real servers and proxies give (issue 20).

The fetcher, and then the real daemon, fetch from moto's S3 server through the fault aws_proxy, which
answers a ranged GET with the whole object (200), with another range of the same length (a shifted
206), without x-amz-checksum-* headers (as AWS answers every ranged GET), or with a byte flipped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import Counter
from pathlib import Path

import crc32c
import pytest
from boto3.s3.transfer import TransferConfig
from conftest import write_manifest

from s3cache import resolve
from s3cache.fetch.fetcher import Fetcher
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.store.index import Index

KiB, MiB = 1 << 10, 1 << 20


def on_nth(n: int | set[int], fault: str, method: str = "GET", query: str = ""):
    """A plan that answers the ``n``-th matching request (or each of a set) for each object with ``fault``."""
    wanted = n if isinstance(n, set) else {n}
    seen: Counter = Counter()
    lock = threading.Lock()

    def plan(m: str, path: str, q: str):
        if m != method or query not in q:
            return None
        with lock:
            seen[path] += 1
            return fault if seen[path] in wanted else None

    return plan


def fetch_bytes(f: Fetcher, entry: Entry):
    got = f.fetch(entry, admit=lambda n: True)
    return got, Path(got.tmp_path).read_bytes()


def multipart(s3, bucket: str, key: str, parts: list[bytes], **extra) -> bytes:
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    done = []
    for i, p in enumerate(parts, 1):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=i, Body=p)
        done.append({"PartNumber": i, "ETag": r["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": done})
    return b"".join(parts)


# -- item 1: never write outside the requested range --------------------------------------------------

def test_a_part_answered_with_the_whole_object_is_never_written_past_its_range(moto, bucket, aws_proxy, fetcher):
    body = os.urandom(4 * MiB + 123)
    moto.client().put_object(Bucket=bucket, Key="k", Body=body)  # with boto3's default CRC32
    aws_proxy.plan = on_nth(3, "ignore-range")  # a later part comes back as the whole object, with 200
    got, data = fetch_bytes(fetcher(), Entry(ObjectRef(bucket, "k")))
    assert aws_proxy.faults["ignore-range"] == 1
    assert len(data) == len(body) and data == body
    assert got.method == "s3-crc32"


def test_a_whole_object_answer_to_the_first_request_is_taken_as_the_object(s3, bucket, aws_proxy, fetcher):
    body = os.urandom(3 * MiB + 1)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = on_nth(1, "ignore-range")
    got, data = fetch_bytes(fetcher(transport="botocore"), Entry(ObjectRef(bucket, "k")))  # botocore takes a 200
    assert data == body and got.method == "etag-md5"
    assert aws_proxy.gets(f"/{bucket}/k") == 1  # the body was all of it: no part asked for again


# -- item 2: Content-Range on every part --------------------------------------------------------------

@pytest.mark.parametrize("nth", [1, 2])  # the first answer, and a later part
def test_a_shifted_range_is_rejected_even_for_an_object_checked_by_size(s3, bucket, aws_proxy, fetcher, nth):
    body = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="k", Body=body, ServerSideEncryption="aws:kms")  # no usable check
    aws_proxy.plan = on_nth(nth, "shift")
    got, data = fetch_bytes(fetcher(), Entry(ObjectRef(bucket, "k")))
    assert aws_proxy.faults["shift"] == 1
    assert data == body and got.method == "size"


# -- item 3: no silent "size alone" -------------------------------------------------------------------

def test_checksums_missing_from_a_ranged_answer_are_asked_for(moto, bucket, aws_proxy, fetcher):
    body = os.urandom(200 * KiB)
    moto.client().put_object(Bucket=bucket, Key="k", Body=body, ServerSideEncryption="aws:kms")  # CRC32
    aws_proxy.plan = on_nth(1, "flip")
    f = fetcher()
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k")))
    assert aws_proxy.faults["flip"] == 1
    assert data == body and got.method == "s3-crc32"
    assert f.counters.retries == 1


def test_a_part_head_without_a_part_count_is_retried_not_taken_for_size_alone(s3, bucket, aws_proxy, fetcher):
    body = multipart(s3, bucket, "k", [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(MiB)])
    # Twice: the fetcher used to ask twice (for the HEAD's check and for the ETag's) and fell back to the
    # size alone when both answers lacked it.
    aws_proxy.plan = on_nth({1, 2}, "no-parts-count", method="HEAD", query="partNumber")
    got, data = fetch_bytes(fetcher(part_size=4 * MiB), Entry(ObjectRef(bucket, "k")))
    assert aws_proxy.faults["no-parts-count"] == 2
    assert data == body and got.method == "etag-multipart"


# -- item 4: size-only objects are named, and can be refused ------------------------------------------

def test_size_only_is_warned_about_once_and_refused_when_checksums_are_required(s3, bucket, aws_proxy, fetcher,
                                                                               caplog, store):
    from s3cache.errors import NoChecksum

    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000, ServerSideEncryption="aws:kms")
    entry = Entry(ObjectRef(bucket, "k"))
    f = fetcher()
    with caplog.at_level(logging.WARNING, logger="s3cache.fetch"):
        for _ in range(2):
            got, _ = fetch_bytes(f, entry)
            assert got.method == "size"
            os.unlink(got.tmp_path)
    warned = [r.getMessage() for r in caplog.records if "size alone" in r.getMessage()]
    assert len(warned) == 1 and f"s3://{bucket}/k" in warned[0] and "sha256=" in warned[0]
    with pytest.raises(NoChecksum) as ei:
        fetcher(require_checksum=True).fetch(entry, admit=lambda n: True)
    assert ei.value.uri == f"s3://{bucket}/k" and ei.value.code == "NoChecksum"
    assert os.listdir(store.layout.tmp) == []


# -- item 5 and 6: uneven parts, DSSE -----------------------------------------------------------------

def test_multipart_with_uneven_parts_verifies_by_its_etag(s3, bucket, aws_proxy, fetcher):
    body = multipart(s3, bucket, "k", [os.urandom(5 * MiB), os.urandom(6 * MiB), os.urandom(5 * MiB)])
    f = fetcher(part_size=4 * MiB, max_attempts=2)
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k")))
    assert data == body and got.method == "etag-multipart" and got.etag.endswith("-3")
    assert f.counters.retries == 0


def test_a_kms_etag_is_never_taken_for_an_md5():
    from s3cache.fetch.checks import s3_expectations

    etag = "0123456789abcdef0123456789abcdef"
    assert [e.method for e in s3_expectations({}, etag, True)] == ["etag-md5"]
    for sse in ("aws:kms", "aws:kms:dsse"):
        assert s3_expectations({"ServerSideEncryption": sse}, etag, True) == []
    assert s3_expectations({"SSECustomerAlgorithm": "AES256"}, etag, True) == []
    assert [e.method for e in s3_expectations({"ServerSideEncryption": "AES256"}, etag, True)] == ["etag-md5"]


# -- item 7: the strongest check, the manifest's beside it, and wrong claims fail at once --------------

def test_s3_sha256_is_preferred_and_a_wrong_manifest_crc32c_fails_after_one_download(moto, bucket, aws_proxy, fetcher):
    from s3cache.errors import WrongChecksum

    body = os.urandom(3 * MiB + 3)
    moto.client().put_object(Bucket=bucket, Key="k", Body=body, ChecksumAlgorithm="SHA256")
    crc = format(crc32c.crc32c(body), "08x")
    f = fetcher()
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k"), crc32c=crc))
    assert data == body and got.method == "s3-sha256" and got.also == ("crc32c",)
    gets = aws_proxy.gets(f"/{bucket}/k")
    wrong = format(int(crc, 16) ^ 1, "08x")
    with pytest.raises(WrongChecksum, match="manifest's checksum is wrong"):
        f.fetch(Entry(ObjectRef(bucket, "k"), crc32c=wrong), admit=lambda n: True)
    assert aws_proxy.gets(f"/{bucket}/k") - gets == 4  # one download (four 1 MiB parts), not one per attempt


def test_a_stable_mismatch_with_no_second_check_fails_after_three_downloads(s3, bucket, aws_proxy, fetcher):
    from s3cache.errors import WrongChecksum

    s3.put_object(Bucket=bucket, Key="k", Body=b"y" * 5000, ServerSideEncryption="aws:kms")
    f = fetcher(max_attempts=8)
    with pytest.raises(WrongChecksum, match="3 downloads"):
        f.fetch(Entry(ObjectRef(bucket, "k"), sha256="0" * 64), admit=lambda n: True)
    assert aws_proxy.gets(f"/{bucket}/k") == 3


def test_a_flipped_byte_under_a_manifest_checksum_is_still_retried(s3, bucket, aws_proxy, fetcher):
    body = os.urandom(100 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body, ServerSideEncryption="aws:kms")
    aws_proxy.plan = on_nth(1, "flip")
    got, data = fetch_bytes(fetcher(), Entry(ObjectRef(bucket, "k"), sha256=hashlib.sha256(body).hexdigest()))
    assert data == body and got.method == "sha256" and aws_proxy.faults["flip"] == 1


# -- end to end: every kind of object, every bad answer, through the real daemon -----------------------

def kinds(moto, s3, bucket) -> dict[str, tuple[bytes, str, str]]:
    """key -> (bytes, manifest fields, the method that must verify it)."""
    crt = moto.client()  # boto3's default checksums
    rnd = lambda n: os.urandom(n)  # noqa: E731
    out: dict[str, tuple[bytes, str, str]] = {}

    def put(key, client, body, fields, method, **extra):
        client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        out[key] = (body, fields, method)

    b = rnd(2 * MiB + 1)
    put("m-sha256", s3, b, f"sha256={hashlib.sha256(b).hexdigest()}", "sha256")
    b = rnd(300 * KiB)
    put("m-md5", s3, b, f"md5={hashlib.md5(b).hexdigest()}", "md5")
    b = rnd(2 * MiB + 3)
    put("m-crc32c", s3, b, f"crc32c={crc32c.crc32c(b):08x}", "crc32c")
    b = rnd(2 * MiB + 5)
    put("both", crt, b, f"crc32c={crc32c.crc32c(b):08x}", "s3-sha256", ChecksumAlgorithm="SHA256")
    put("s3-sha256", crt, rnd(2 * MiB + 7), "", "s3-sha256", ChecksumAlgorithm="SHA256")
    put("s3-sha1", crt, rnd(700 * KiB), "", "s3-sha1", ChecksumAlgorithm="SHA1")
    put("s3-crc64nvme", crt, rnd(2 * MiB + 9), "", "s3-crc64nvme", ChecksumAlgorithm="CRC64NVME")
    put("s3-crc32c", crt, rnd(100 * KiB), "", "s3-crc32c", ChecksumAlgorithm="CRC32C")
    put("s3-crc32", crt, rnd(3 * MiB + 11), "", "s3-crc32")
    put("etag", s3, rnd(2 * MiB + 13), "", "etag-md5")
    put("kms-crc32", crt, rnd(MiB + 17), "", "s3-crc32", ServerSideEncryption="aws:kms")
    put("kms", s3, rnd(500 * KiB), "", "size", ServerSideEncryption="aws:kms")
    put("dsse", s3, rnd(2 * MiB + 19), "", "size", ServerSideEncryption="aws:kms:dsse")
    out["mp-even"] = (multipart(s3, bucket, "mp-even", [rnd(5 * MiB), rnd(5 * MiB), rnd(MiB)]), "", "etag-multipart")
    out["mp-uneven"] = (multipart(s3, bucket, "mp-uneven", [rnd(5 * MiB), rnd(6 * MiB), rnd(5 * MiB)]), "",
                        "etag-multipart")
    s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "mp-uneven"})
    out["copy"] = (out["mp-uneven"][0], "", "etag-md5")
    crt.upload_fileobj(io.BytesIO(b := rnd(11 * MiB)), bucket, "mp-crc32", Config=TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    out["mp-crc32"] = (b, "", "s3-crc32")
    # A copy of a composite-checksum object: a one-part MD5 ETag beside the source's composite CRC32 (with
    # no "-N": read as the whole object's, it fails; the ETag agrees).
    s3.copy_object(Bucket=bucket, Key="copy-crc32", CopySource={"Bucket": bucket, "Key": "mp-crc32"})
    out["copy-crc32"] = (b, "", "etag-md5")
    return out


def test_every_kind_of_object_survives_every_bad_answer(tmp_path, moto, s3, bucket, aws_proxy, daemons):
    objects = kinds(moto, s3, bucket)
    size_only = {f"/{bucket}/{k}" for k, (_, _, m) in objects.items() if m == "size"}
    seen: Counter = Counter()
    lock = threading.Lock()

    def plan(method: str, path: str, query: str):
        # Each object's first GETs are answered badly, one of each kind: a flipped byte (not for objects
        # checked by size alone, which nothing could catch), a shifted range, the whole object for a range.
        if method != "GET":
            return None
        with lock:
            seen[path] += 1
            n = seen[path]
        faults = ["shift", "ignore-range"] if path in size_only else ["flip", "shift", "ignore-range"]
        return faults[n - 1] if n <= len(faults) else None

    aws_proxy.plan = plan
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/{k} {f}".strip() for k, (_, f, _) in objects.items()])
    d = daemons(manifest=m, args=["--endpoint-url", aws_proxy.url, "--part-size", "1M", "--prefetch-part-size", "1M",
                                  "--workers", "4", "--max-attempts", "10"])
    st = d.wait_until(lambda st: st["objects"]["ready"] + st["objects"]["failed"] == len(objects), timeout=300,
                      what="every object to land through the bad answers")
    assert st["objects"]["failed"] == 0, st["failures"]
    assert set(aws_proxy.faults) == {"flip", "shift", "ignore-range"}, aws_proxy.faults
    uris = [f"s3://{bucket}/{k}" for k in objects]
    paths = resolve(uris, cache_dir=d.cache_dir)
    for key, path in zip(objects, paths):
        assert Path(path).read_bytes() == objects[key][0], f"{key}: wrong bytes served"
    d.stop()
    idx = Index(str(tmp_path / "cache" / ".s3cache" / "index"))
    try:
        methods = {uri.rsplit("/", 1)[1]: rec.method for uri, rec in idx.items()}
    finally:
        idx.close()
    want = {k: want for k, (_, _, want) in objects.items()}
    # A small object the CRT fetches (unless its folder's last object was large): its ranged GET answered with
    # the whole object (the third fault) is asked again through botocore, whose 206 carries no checksum (as
    # AWS's): its MD5 ETag checks it, where botocore's path HEADs after that 200 and finds S3's.
    crt = {k: methods[k] for k in ("s3-sha1", "s3-crc32c") if methods.get(k) == "etag-md5"}
    assert methods == {**want, **crt}
    print(f"faults: {dict(aws_proxy.faults)}; requests: {aws_proxy.total()}")
