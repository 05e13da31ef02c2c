"""The fetcher against moto's real S3 server over HTTP: one object at a time, into a temp file."""

import hashlib
import os
import threading

import botocore
import pytest

from s3cache.errors import FetchFailed, WrongChecksum
from s3cache.fetch.fetcher import Fetcher, NeedSpace, make_client
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef

MiB = 1 << 20


@pytest.fixture
def make_fetcher(moto, store):
    made = []

    def make(client=None, part_size=MiB, max_attempts=3):
        f = Fetcher(client or make_client(moto.url, "us-east-1", 16, 5, 10), part_size=part_size, workers=4,
                    max_attempts=max_attempts, cancel=threading.Event(), new_temp=store.new_temp,
                    discard=store.discard)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_small_object_is_one_request_and_verified_by_etag(s3, bucket, make_fetcher, store):
    body = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="small.bin", Body=body)
    f = make_fetcher()
    got = f.fetch(Entry(ObjectRef(bucket, "small.bin")), admit=lambda n: True)
    assert read(got.tmp_path) == body
    assert got.method == "etag-md5" and got.size == len(body)
    assert f.counters.requests == 1
    assert os.path.dirname(got.tmp_path) == store.layout.tmp
    assert oct(os.stat(got.tmp_path).st_mode & 0o777) == "0o600"


def test_large_object_in_parallel_ranged_parts(s3, bucket, make_fetcher):
    body = os.urandom(5 * MiB + 123)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=body)
    f = make_fetcher(part_size=MiB)
    got = f.fetch(Entry(ObjectRef(bucket, "big.bin")), admit=lambda n: True)
    assert read(got.tmp_path) == body
    assert f.counters.requests == 1 + 5 + 1  # first part, four more parts, one HEAD for a whole-object checksum
    assert got.method == "etag-md5"


def test_multipart_etag_with_short_last_part(s3, bucket, make_fetcher):
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(MiB + 7)]
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="mp.bin")
    done = []
    for i, p in enumerate(parts, 1):
        r = s3.upload_part(Bucket=bucket, Key="mp.bin", UploadId=mpu["UploadId"], PartNumber=i, Body=p)
        done.append({"PartNumber": i, "ETag": r["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key="mp.bin", UploadId=mpu["UploadId"],
                                 MultipartUpload={"Parts": done})
    f = make_fetcher(part_size=4 * MiB)
    got = f.fetch(Entry(ObjectRef(bucket, "mp.bin")), admit=lambda n: True)
    assert read(got.tmp_path) == b"".join(parts)
    assert got.method == "etag-multipart" and got.etag.endswith("-3")


def test_manifest_checksum_wins_and_a_mismatch_is_never_handed_back(s3, bucket, make_fetcher, store):
    body = b"hello world" * 1000
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    f = make_fetcher()
    good = f.fetch(Entry(ObjectRef(bucket, "k"), sha256=hashlib.sha256(body).hexdigest()), admit=lambda n: True)
    assert good.method == "sha256"
    os.unlink(good.tmp_path)
    with pytest.raises(WrongChecksum, match="sha256.*etag-md5 agrees"):
        f.fetch(Entry(ObjectRef(bucket, "k"), sha256="0" * 64), admit=lambda n: True)
    assert os.listdir(store.layout.tmp) == []
    # The ETag (an MD5 of the bytes) vouches for them: the manifest is wrong, and fetching again cannot
    # help (issue 17 item 16: it used to be retried, a full download each).
    assert f.counters.requests == 1 + 1 and f.counters.retries == 0


def test_object_overwritten_mid_download_never_yields_a_mixed_file(s3, bucket, make_fetcher):
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="moving.bin", Body=old)
    overwritten = []

    def admit(n):
        # Called after the first part's response arrived: overwrite the object before the other parts.
        if not overwritten:
            s3.put_object(Bucket=bucket, Key="moving.bin", Body=new)
            overwritten.append(True)
        return True

    f = make_fetcher(part_size=MiB)
    got = f.fetch(Entry(ObjectRef(bucket, "moving.bin")), admit=admit)
    assert read(got.tmp_path) == new
    assert got.etag == hashlib.md5(new).hexdigest()


@pytest.mark.parametrize("key_exists,bucket_exists,code", [(False, True, "NoSuchKey"), (False, False, "NoSuchBucket")])
def test_permanent_errors_fail_at_once_with_their_code(s3, bucket, make_fetcher, key_exists, bucket_exists, code):
    f = make_fetcher()
    b = bucket if bucket_exists else bucket + "-missing"
    with pytest.raises(FetchFailed) as ei:
        f.fetch(Entry(ObjectRef(b, "nope")), admit=lambda n: True)
    assert ei.value.code == code
    assert f.counters.retries == 0


def test_access_denied_is_not_retried(moto, s3, bucket, make_fetcher):
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    unsigned = make_fetcher(client=moto.client(signature_version=botocore.UNSIGNED,
                                               retries={"total_max_attempts": 1}))
    with pytest.raises(FetchFailed) as ei:
        unsigned.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
    assert ei.value.code == "AccessDenied"
    assert unsigned.counters.retries == 0


def test_size_mismatch_with_manifest(s3, bucket, make_fetcher):
    s3.put_object(Bucket=bucket, Key="k", Body=b"12345")
    with pytest.raises(FetchFailed) as ei:
        make_fetcher().fetch(Entry(ObjectRef(bucket, "k"), size=4), admit=lambda n: True)
    assert ei.value.code == "SizeMismatch"


def test_no_room_aborts_before_writing(s3, bucket, make_fetcher, store):
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 5000)
    with pytest.raises(NeedSpace) as ei:
        make_fetcher().fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: False)
    assert ei.value.size == 5000
    assert os.listdir(store.layout.tmp) == []


def test_listing_is_paginated_and_in_key_order(s3, bucket, make_fetcher):
    keys = [f"p/{i:04d}" for i in range(1005)]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=b"")
    s3.put_object(Bucket=bucket, Key="other", Body=b"")
    f = make_fetcher()
    listed = f.list(bucket, "p/")
    assert [o.key for o in listed] == keys
    assert f.counters.requests == 2


def test_empty_object(s3, bucket, make_fetcher):
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    got = make_fetcher().fetch(Entry(ObjectRef(bucket, "empty")), admit=lambda n: True)
    assert read(got.tmp_path) == b"" and got.size == 0 and got.method == "etag-md5"


@pytest.mark.parametrize("how,algo,method", [
    ("put", None, "s3-crc32"),  # boto3's default CRC32 on a single PUT
    ("multipart", None, "s3-crc32"),  # boto3's default on a multipart upload
    ("multipart", "SHA256", "s3-sha256"),  # COMPOSITE: the SHA-256 of the part SHA-256s, "-N"
    ("multipart", "CRC32C", "s3-crc32c"),
])
def test_s3_additional_checksums_verify_large_objects(moto, bucket, make_fetcher, how, algo, method):
    import io

    from boto3.s3.transfer import TransferConfig

    if algo == "CRC32C":
        pytest.importorskip("awscrt", reason="boto3 computes CRC32C only with awscrt")
    s3 = moto.client()  # with boto3's default checksums
    body = os.urandom(12 * MiB + 77)
    extra = {"ChecksumAlgorithm": algo} if algo else {}
    if how == "put":
        s3.put_object(Bucket=bucket, Key="k", Body=body, **extra)
    else:
        s3.upload_fileobj(io.BytesIO(body), bucket, "k", ExtraArgs=extra,
                          Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    got = make_fetcher(part_size=4 * MiB).fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
    assert read(got.tmp_path) == body
    assert got.method == method


def test_small_object_checksum_from_the_one_response(moto, bucket, make_fetcher):
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="k", Body=b"abc" * 1000, ChecksumAlgorithm="SHA256")
    f = make_fetcher()
    got = f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
    assert got.method == "s3-sha256" and f.counters.requests == 1


def test_crc64nvme_full_object_checksum(moto, bucket, make_fetcher):
    pytest.importorskip("awscrt")
    s3 = moto.client()
    body = os.urandom(6 * MiB + 1)
    s3.put_object(Bucket=bucket, Key="k", Body=body, ChecksumAlgorithm="CRC64NVME")
    got = make_fetcher(part_size=2 * MiB).fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
    assert read(got.tmp_path) == body and got.method == "s3-crc64nvme"


def test_a_prefetch_in_flight_can_be_promoted_once(s3, bucket, make_fetcher):
    s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(3 * MiB))
    f = make_fetcher(part_size=MiB)
    seen = []

    def admit(n):  # runs inside the fetch, after the first response: the fetch is in flight
        seen.append((f.promote(f"s3://{bucket}/k"), f.promote(f"s3://{bucket}/k")))
        return True

    assert not f.promote(f"s3://{bucket}/k")  # nothing in flight yet
    got = f.fetch(Entry(ObjectRef(bucket, "k")), admit=admit)
    assert seen == [(True, False)]
    assert read(got.tmp_path) and f._fg_idle.is_set()  # the foreground count went back to zero


def test_prefetch_takes_larger_parts_than_a_waiting_reader(s3, bucket, moto, store):
    body = os.urandom(4 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    # botocore's first GET is the subject (the CRT asks for a prefetch's first 2 MiB: test_crt_sizes.py)
    f = Fetcher(make_client(moto.url, "us-east-1", 16, 5, 10), part_size=MiB, prefetch_part_size=8 * MiB,
                workers=4, max_attempts=3, cancel=threading.Event(), new_temp=store.new_temp,
                discard=store.discard, transport="botocore")
    try:
        bg = f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
        assert f.counters.requests == 1  # one GET: with other objects in flight, parts add no bandwidth
        fg = f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True, foreground=True)
        assert f.counters.requests == 1 + 5 + 1  # five 1 MiB ranged GETs for the reader, one HEAD
        assert read(bg.tmp_path) == read(fg.tmp_path) == body
    finally:
        f.close()


def test_the_body_is_hashed_once_by_us_not_again_by_botocore(moto, bucket):
    from botocore.response import StreamingBody

    moto.client().put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)  # with boto3's default CRC32
    r = make_client(moto.url, "us-east-1", 4, 5, 10).get_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert r["ChecksumCRC32"]  # still there for our Digest to check
    assert type(r["Body"]) is StreamingBody  # not botocore's hashing wrapper: that was a second pass
    assert r["Body"].read() == b"x" * 1000
