"""Objects whose only check is an MD5 (an ETag, single-part or multipart): hashed in order as the parts
stream, with no second read of the file; only bytes that landed before the hash reached them are read
back. A flipped byte is still caught, and a part attempt cut off mid-stream leaves nothing in the hash."""

from __future__ import annotations

import os
import threading

import pytest

from s3cache.errors import ChecksumMismatch
from s3cache.fetch.checksum import Digest, Expectation
from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.fetch.partdigest import InOrderDigest
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.store.files import Store
from s3cache.testing.faultproxy import FaultProxy

MiB = 1 << 20


def fetcher(url: str, store: Store, part_size: int = MiB, max_attempts: int = 3) -> Fetcher:
    return Fetcher(make_client(url, "us-east-1", 16, 5, 10), part_size=part_size, workers=4,
                   max_attempts=max_attempts, cancel=threading.Event(), new_temp=store.new_temp,
                   discard=store.discard)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_single_part_md5_object_in_ranged_parts_is_not_read_back(moto, s3, bucket, store):
    body = os.urandom(6 * MiB + 77)
    s3.put_object(Bucket=bucket, Key="k", Body=body)  # no additional checksum: the ETag's MD5 is all
    f = fetcher(moto.url, store)
    try:
        got = f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
        assert got.method == "etag-md5" and read(got.tmp_path) == body
        assert f.counters.requests >= 1 + 6  # it did come in parts
        assert f.counters.readback < len(body)  # the whole file was read back before
    finally:
        f.close()


def test_a_multipart_etag_over_parts_cut_elsewhere_is_hashed_in_order(moto, s3, bucket, store):
    sizes = (5 * MiB, 5 * MiB, MiB + 3)
    parts = [os.urandom(n) for n in sizes]
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp")
    etags = [s3.upload_part(Bucket=bucket, Key="mp", UploadId=up["UploadId"], PartNumber=i + 1, Body=p)["ETag"]
             for i, p in enumerate(parts)]
    s3.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=up["UploadId"], MultipartUpload={
        "Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]})
    f = fetcher(moto.url, store, part_size=2 * MiB)  # ranges that do not line up with the upload's parts
    try:
        got = f.fetch(Entry(ObjectRef(bucket, "mp")), admit=lambda n: True)
        assert got.method == "etag-multipart" and read(got.tmp_path) == b"".join(parts)
        assert f.counters.readback < sum(sizes)
    finally:
        f.close()


def test_a_flipped_byte_in_one_part_is_still_caught(moto, s3, bucket, store):
    body = os.urandom(5 * MiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    gets = []

    def plan(method, path, query):  # flip a byte in the third GET of every attempt: never verifies
        if method == "GET" and path.endswith("/k"):
            gets.append(1)
            return "flip" if len(gets) % 5 == 3 else None
        return None

    with FaultProxy(moto.port, plan, ranged_checksums=False) as proxy:
        f = fetcher(proxy.url, store, max_attempts=2)
        try:
            with pytest.raises(ChecksumMismatch):
                f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
            assert proxy.faults["flip"] >= 1
        finally:
            f.close()


def test_a_part_cut_off_mid_stream_is_hashed_again_from_its_retry(moto, s3, bucket, store):
    """The first part streams at the frontier (hashed as it comes) and is reset halfway: its bytes leave
    the hash, the retry's go in, and the object verifies."""
    body = os.urandom(4 * MiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    seen = []

    def plan(method, path, query):
        if method == "GET" and path.endswith("/k"):
            seen.append(1)
            return "reset" if len(seen) == 1 else None  # the first GET is the first part (bytes=0-)
        return None

    with FaultProxy(moto.port, plan) as proxy:
        f = fetcher(proxy.url, store)
        try:
            got = f.fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)
            assert proxy.faults["reset"] == 1
            assert proxy.gets(f"/{bucket}/k") == 4 + 1  # four 1 MiB parts, the first one twice
            assert got.method == "etag-md5" and read(got.tmp_path) == body
        finally:
            f.close()


def test_in_order_digest_reads_back_only_what_landed_ahead_of_the_frontier(tmp_path):
    import hashlib

    data = os.urandom(3 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        d = InOrderDigest(Digest(Expectation("md5", hashlib.md5(data).hexdigest())), fd)
        last = d.attempt(2 * MiB)  # the last part lands first: nothing can be hashed yet
        last.update(data[2 * MiB:])
        d.finished(last)
        assert d.frontier == 0
        first = d.attempt(0)
        first.update(data[: MiB // 2])  # at the frontier: hashed as it streams
        assert d.frontier == MiB // 2 and d.readback == 0
        d.failed(first)  # cut off: what it fed is forgotten
        assert d.frontier == 0
        first = d.attempt(0)
        first.update(data[:MiB])
        d.finished(first)
        middle = d.attempt(MiB)
        middle.update(data[MiB : 2 * MiB])
        d.finished(middle)  # reaches the part that landed first, which is read back
        assert d.readback == MiB and d.result(len(data)).check("x", len(data)) == "md5"
    finally:
        os.close(fd)
