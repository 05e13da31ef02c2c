"""Every size and checksum S3 states, checked; and no right object refused for good (issue 28).

The fetcher fetches from moto's S3 server through the fault aws_proxy, which can answer a ranged GET with a
200 carrying only the range, lie in a Content-Range total, drop x-amz-checksum-type or a part count, and
send checksums moto does not (SHA-512, MD5, XXHASH) or an ETag that is not an MD5.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import zlib
from collections import Counter
from pathlib import Path

import pytest
import xxhash

from s3cache.errors import FetchFailed, NoChecksum
from s3cache.fetch.checksum import Digest, Expectation
from s3cache.fetch.fetcher import Fetcher
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def fetch_attempts() -> int:
    """These fetches give up after four attempts (conftest's ``fetcher`` takes five)."""
    return 4


def nth_get(n: int, fault: str):
    """A plan answering the ``n``-th GET of each object with ``fault``."""
    seen: Counter = Counter()
    lock = threading.Lock()

    def plan(method: str, path: str, query: str):
        if method != "GET":
            return None
        with lock:
            seen[path] += 1
            return fault if seen[path] == n else None

    return plan


def fetch_bytes(f: Fetcher, entry: Entry):
    got = f.fetch(entry, admit=lambda n: True)
    return got, Path(got.tmp_path).read_bytes()


def multipart(client, bucket: str, key: str, parts: list[bytes], complete: dict | None = None, **extra) -> bytes:
    mpu = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    algo = {"ChecksumAlgorithm": extra["ChecksumAlgorithm"]} if "ChecksumAlgorithm" in extra else {}
    done = []
    for i, p in enumerate(parts, 1):
        r = client.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=i, Body=p, **algo)
        done.append({"PartNumber": i, "ETag": r["ETag"], **{k: v for k, v in r.items() if k.startswith("ChecksumCRC")}})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                     MultipartUpload={"Parts": done}, **(complete or {}))
    return b"".join(parts)


# -- item 1 and 7: every size claim against the HEAD ----------------------------------------------------

@pytest.mark.parametrize("fault", ["range-as-200", "lie-total"])
def test_an_answer_with_only_part_of_the_object_is_never_published(s3, bucket, aws_proxy, fetcher, fault):
    body = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="k", Body=body, ServerSideEncryption="aws:kms")  # checked by size alone
    aws_proxy.plan = nth_get(1, fault)
    got, data = fetch_bytes(fetcher(), Entry(ObjectRef(bucket, "k")))
    assert aws_proxy.faults[fault] == 1
    assert len(data) == len(body) and data == body and got.method == "size"


def test_one_wrong_total_does_not_fail_an_entry_that_states_its_size(s3, bucket, aws_proxy, fetcher):
    body = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = nth_get(1, "lie-total")
    f = fetcher()
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k"), size=len(body)))
    assert aws_proxy.faults["lie-total"] == 1 and data == body and got.method == "etag-md5"
    # A size S3 itself confirms is still a permanent mismatch.
    aws_proxy.plan = lambda m, p, q: None
    with pytest.raises(FetchFailed, match=f"S3 says {len(body)} bytes, the manifest says {len(body) + 1}"):
        f.fetch(Entry(ObjectRef(bucket, "k"), size=len(body) + 1), admit=lambda n: True)


# -- item 2: S3's newer checksums ---------------------------------------------------------------------

NEWER = {"sha512": hashlib.sha512, "md5": hashlib.md5, "xxhash64": xxhash.xxh64, "xxhash3": xxhash.xxh3_64,
         "xxhash128": xxhash.xxh3_128}


def test_xxhash_values_are_s3s_canonical_big_endian_digests():
    # XXH64, XXH3-64 and XXH3-128 of no bytes, seed 0, from the xxHash specification's test vectors.
    for method, value in (("s3-xxhash64", "ef46db3751d8e999"), ("s3-xxhash3", "2d06800538d394c2"),
                          ("s3-xxhash128", "99aa06d3014798d86001c324468d497f")):
        assert Digest(Expectation(method, value)).check("empty", 0) == method


@pytest.mark.parametrize("algo", sorted(NEWER))
def test_newer_s3_checksums_are_verified(s3, bucket, aws_proxy, fetcher, algo):
    body = os.urandom(2 * MiB + 3)
    s3.put_object(Bucket=bucket, Key="k", Body=body, ServerSideEncryption="aws:kms")  # the ETag is no MD5
    value = base64.b64encode(NEWER[algo](body).digest()).decode()
    # Sent on HEADs and whole answers, as S3 does; the first GET's bytes are flipped.
    aws_proxy.headers_for = lambda m, p, st: {f"x-amz-checksum-{algo}": value} if st != 206 else {}
    aws_proxy.plan = nth_get(1, "flip")
    f = fetcher(require_checksum=True)
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k")))
    assert aws_proxy.faults["flip"] == 1 and data == body and got.method == f"s3-{algo}"
    assert f.counters.retries == 1


# -- item 3 and 5: one rule for composite checksums, both readings on a mismatch -----------------------

def test_crc64nvme_is_never_read_as_composite():
    from s3cache.fetch.checks import part_count, s3_expectations

    crc = base64.b64encode(b"\x01" * 8).decode()
    etag = "0" * 32 + "-3"
    assert part_count("s3-crc64nvme", crc, etag, None) == ""
    assert part_count("s3-crc32", crc[:8], etag, None) == "3"
    assert part_count("s3-crc32", crc[:8], etag, "FULL_OBJECT") == ""
    [claim, _] = s3_expectations({"ChecksumCRC64NVME": crc}, etag, True)
    assert claim == Expectation("s3-crc64nvme", "01" * 8)


def test_a_copy_of_a_composite_checksum_object_is_verified_by_its_md5_etag(moto, s3, bucket, aws_proxy, fetcher):
    crt = moto.client()
    body = multipart(crt, bucket, "src", [os.urandom(5 * MiB), os.urandom(MiB)], ChecksumAlgorithm="CRC32")
    s3.copy_object(Bucket=bucket, Key="k", CopySource={"Bucket": bucket, "Key": "src"})
    # In two parts, so the HEAD's checksum (of the source's parts, and no "-N") is the one checked.
    f = fetcher(part_size=4 * MiB)
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k")))
    assert data == body and got.method == "etag-md5"
    assert aws_proxy.gets(f"/{bucket}/k") == 2  # one download: the ETag agreeing settles it


@pytest.mark.parametrize("declared", [True, False])
def test_a_full_object_checksum_from_a_server_that_does_not_say_so(moto, bucket, aws_proxy, fetcher, declared):
    crt = moto.client()
    parts = [os.urandom(5 * MiB), os.urandom(MiB)]
    crc = base64.b64encode(zlib.crc32(b"".join(parts)).to_bytes(4, "big")).decode()
    # The whole object's CRC32 given at completion, as SDKs do for FULL_OBJECT (moto does not compute it).
    body = multipart(crt, bucket, "k", parts, {"ChecksumType": "FULL_OBJECT", "ChecksumCRC32": crc},
                     ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
    assert crt.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")["ChecksumType"] == "FULL_OBJECT"
    aws_proxy.plan = lambda m, p, q: None if declared else "no-checksum-type"
    f = fetcher(part_size=4 * MiB)
    got, data = fetch_bytes(f, Entry(ObjectRef(bucket, "k")))
    assert data == body and got.method == "s3-crc32" and (declared or aws_proxy.faults["no-checksum-type"] >= 1)
    assert aws_proxy.gets(f"/{bucket}/k") == 2  # one download in two parts


def test_an_etag_that_is_not_an_md5_leaves_the_size_alone(s3, bucket, aws_proxy, fetcher, caplog):
    body = os.urandom(200 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    fake = '"' + "ab" * 16 + '"'  # 32 hex digits, as Swift SLOs and S3 directory buckets send
    aws_proxy.headers_for = lambda m, p, st: {"ETag": fake}
    with caplog.at_level(logging.WARNING, logger="s3cache.fetch"):
        got, data = fetch_bytes(fetcher(), Entry(ObjectRef(bucket, "k")))
    assert data == body and got.method == "size"
    assert aws_proxy.gets(f"/{bucket}/k") == 3  # three identical downloads tell it from a transfer error
    assert any("size alone" in r.getMessage() for r in caplog.records)
    with pytest.raises(NoChecksum):
        fetcher(require_checksum=True).fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)


# -- item 4: empty parts ------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(5 * MiB, 5 * MiB, 0), (0,)])
def test_multipart_uploads_with_an_empty_part_are_verified_by_their_etag(s3, bucket, aws_proxy, fetcher, sizes):
    body = multipart(s3, bucket, "k", [os.urandom(n) for n in sizes])
    got, data = fetch_bytes(fetcher(part_size=4 * MiB, max_attempts=2), Entry(ObjectRef(bucket, "k")))
    assert data == body and got.method == "etag-multipart" and got.etag.endswith(f"-{len(sizes)}")


# -- item 6: a server that ignores partNumber ----------------------------------------------------------

def test_a_server_that_ignores_part_numbers_leaves_an_etag_only_object_its_size(s3, bucket, aws_proxy, fetcher, caplog):
    body = multipart(s3, bucket, "k", [os.urandom(5 * MiB), os.urandom(MiB)])
    aws_proxy.plan = lambda m, p, q: "no-parts-count" if m == "HEAD" and "partNumber" in q else None
    with caplog.at_level(logging.WARNING, logger="s3cache.fetch"):
        got, data = fetch_bytes(fetcher(part_size=8 * MiB, max_attempts=3), Entry(ObjectRef(bucket, "k")))
    assert data == body and got.method == "size"
    assert aws_proxy.faults["no-parts-count"] == 3  # asked three times, once per answer, then given up
    # Left with its size alone, which a HEAD confirms.
    assert len([x for x in aws_proxy.seen(f"/{bucket}/k", "HEAD") if "partNumber" not in x.query]) == 1
    assert any("ignores partNumber" in r.getMessage() for r in caplog.records)
    with pytest.raises(NoChecksum):
        fetcher(part_size=8 * MiB, require_checksum=True).fetch(Entry(ObjectRef(bucket, "k")), admit=lambda n: True)


# -- item 3: the manifest states S3's default checksums too ---------------------------------------------

def test_manifest_lines_state_crc64nvme_and_crc32_and_fetches_check_them(moto, bucket, aws_proxy, fetcher):
    from awscrt.checksums import crc64nvme

    from s3cache.errors import WrongChecksum
    from s3cache.manifest.catalog import format_entry
    from s3cache.manifest.parse import parse_line

    body = os.urandom(3 * MiB + 7)
    nvme, crc = f"{crc64nvme(body):016x}", f"{zlib.crc32(body):08x}"
    b64 = base64.b64encode(bytes.fromhex(nvme)).decode()
    e = parse_line(f"s3://{bucket}/k size={len(body)} crc64nvme={b64} crc32={crc.upper()}")
    assert (e.crc64nvme, e.crc32) == (nvme, crc) and parse_line(format_entry(e)) == e
    with pytest.raises(ValueError, match="crc64nvme= must be 16 hex digits"):
        parse_line(f"s3://{bucket}/k crc64nvme={crc}")
    moto.client().put_object(Bucket=bucket, Key="k", Body=body)  # boto3's default CRC32
    f = fetcher()
    got, data = fetch_bytes(f, e)
    assert data == body and got.method == "crc64nvme" and got.also == ()  # the manifest's strongest verifies
    with pytest.raises(WrongChecksum, match="S3's own s3-crc32 agrees"):
        f.fetch(e._replace(crc64nvme="0" * 16, crc32=None), admit=lambda n: True)
