"""Joining the CRCs of parts: what lets parallel parts be verified as they stream."""

import random
import zlib

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.errors import ChecksumMismatch
from s3cache.fetch.checksum import _COMBINERS, Expectation
from s3cache.fetch.partdigest import SplitDigest

CRCS = {"s3-crc32": zlib.crc32, "s3-crc32c": crc32c.crc32c}
try:
    from awscrt.checksums import crc64nvme

    CRCS["s3-crc64nvme"] = crc64nvme
except ImportError:  # the "crt" extra is optional
    pass


@pytest.mark.parametrize("method", sorted(CRCS))
@settings(max_examples=60, deadline=None)
@given(a=st.binary(max_size=2000), b=st.binary(max_size=2000))
def test_combine_equals_the_crc_of_the_concatenation(method, a, b):
    crc = CRCS[method]
    assert _COMBINERS[method].combine(crc(a), crc(b), len(b)) == crc(a + b)


def width(method: str) -> int:
    return 16 if method == "s3-crc64nvme" else 8


@pytest.mark.parametrize("method", sorted(CRCS))
def test_parts_fed_out_of_order_join_to_the_whole_object(method):
    rng = random.Random(3)
    body = rng.randbytes(100_003)
    expect = Expectation(method, format(CRCS[method](body), f"0{width(method)}x"))
    split = SplitDigest(expect)
    cuts = sorted({0, len(body), *rng.sample(range(1, len(body)), 6)})
    ranges = list(zip(cuts, cuts[1:]))
    rng.shuffle(ranges)
    for start, end in ranges:
        d = split.part()
        d.update(body[start:end])
        split.done(start, d)
    joined = split.joined()
    assert joined.check("k", len(body)) == method
    assert joined.local_crc32c == format(crc32c.crc32c(body), "08x")


def test_a_wrong_part_fails_the_whole_object():
    body = bytes(range(256)) * 100
    split = SplitDigest(Expectation("s3-crc32", format(zlib.crc32(body), "08x")))
    for start in range(0, len(body), 4096):
        d = split.part()
        chunk = bytearray(body[start:start + 4096])
        if start == 8192:
            chunk[5] ^= 0x40
        d.update(bytes(chunk))
        split.done(start, d)
    with pytest.raises(ChecksumMismatch, match="s3-crc32"):
        split.joined().check("s3://b/k", len(body))


def test_only_whole_object_crcs_split():
    assert SplitDigest.splittable(None)
    assert SplitDigest.splittable(Expectation("s3-crc32", "00000000"))
    assert SplitDigest.splittable(Expectation("crc32c", "00000000"))
    assert not SplitDigest.splittable(Expectation("s3-crc32", "00000000-3"))  # composite: per upload part
    assert not SplitDigest.splittable(Expectation("etag-md5", "0" * 32))
    assert not SplitDigest.splittable(Expectation("sha256", "0" * 64))
