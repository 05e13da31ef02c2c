"""What checksum.py promises, checked against independent computations (issue 21, mutants mutmut found
alive): the strongest claim wins in METHODS order, S3's multipart ETag and COMPOSITE checksums computed
the way S3 defines them (hash of the part hashes, then -N) for even and uneven parts fed in any chunking,
every claim checked (not just the first), files read from their start, and CRC joining for any width."""

import base64
import hashlib
import importlib.util
import io
import random
import zlib

import crc32c
import pytest

from s3cache.errors import ChecksumMismatch
from s3cache.fetch.checksum import (
    CHUNK,
    METHODS,
    Digest,
    DigestMismatch,
    Expectation,
    _Combiner,
    b64_to_hex,
    digest_file,
    have_crc64nvme,
    is_per_part,
    local_crc32c_of,
    strongest,
)
from s3cache.fetch.partdigest import SplitDigest

BODY = bytes(random.Random(7).getrandbits(8) for _ in range(50_000))


def feed(d, data: bytes, chunk: int):
    for i in range(0, len(data), chunk):
        d.update(data[i:i + chunk])
    return d


# == which claim verifies ======================================================================


def test_the_strongest_claim_is_the_first_in_methods_order():
    claims = [Expectation(m, "00") for m in METHODS]
    rng = random.Random(1)
    for start in range(len(METHODS) - 1):  # "size" is never a claim that verifies
        pool = claims[start:]
        rng.shuffle(pool)
        assert strongest(pool) == Expectation(METHODS[start], "00")
    assert strongest([Expectation("size", "3")]) is None
    assert strongest([]) is None


def test_a_manifest_sha256_beats_s3s_and_s3s_crc_beats_an_etag():
    got = strongest([Expectation("etag-md5", "a"), Expectation("s3-sha256", "b"), Expectation("sha256", "c")])
    assert got.method == "sha256"
    assert strongest([Expectation("etag-md5", "a"), Expectation("s3-crc32", "b")]).method == "s3-crc32"


def test_b64_to_hex():
    assert b64_to_hex("AAAAAQ==") == "00000001"


# == per-part claims: multipart ETags and COMPOSITE checksums ==================================


def multipart_etag(parts: list[bytes]) -> str:
    return hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"


def composite_crc32(parts: list[bytes]) -> str:
    inner = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    return format(zlib.crc32(inner), "08x") + f"-{len(parts)}"


@pytest.mark.parametrize("part_size", [8192, 10_000, 25_000, 50_000])  # 10_000 and 25_000 divide it evenly
@pytest.mark.parametrize("chunk", [1000, 4096, 70_000])
def test_a_multipart_etag_is_the_md5_of_the_part_md5s(part_size, chunk):
    parts = [BODY[i:i + part_size] for i in range(0, len(BODY), part_size)]
    exp = Expectation("etag-multipart", multipart_etag(parts), part_size=part_size)
    assert feed(Digest(exp), BODY, chunk).check("s3://b/k", len(BODY)) == "etag-multipart"


def test_uneven_parts_follow_the_declared_sizes():
    sizes = (5000, 20_000, 1, 24_999)
    parts, at = [], 0
    for n in sizes:
        parts.append(BODY[at:at + n])
        at += n
    exp = Expectation("etag-multipart", multipart_etag(parts), part_sizes=sizes)
    assert feed(Digest(exp), BODY, 3000).check("s3://b/k", len(BODY)) == "etag-multipart"
    # bytes past the declared parts make one part more: an ETag of three parts fails on its count
    d = feed(Digest(Expectation("etag-multipart", multipart_etag(parts[:3]), part_sizes=sizes[:3])), BODY, 3000)
    with pytest.raises(DigestMismatch) as ei:
        d.check("s3://b/k", None)
    assert ei.value.failed[0][1] == multipart_etag(parts)


def test_a_composite_crc32_is_the_crc_of_the_part_crcs():
    parts = [BODY[i:i + 16_384] for i in range(0, len(BODY), 16_384)]
    exp = Expectation("s3-crc32", composite_crc32(parts), part_size=16_384)
    assert is_per_part(exp)
    assert feed(Digest(exp), BODY, 5000).check("s3://b/k", len(BODY)) == "s3-crc32"


def test_an_empty_object_in_parts_is_one_empty_part():
    exp = Expectation("etag-multipart", multipart_etag([b""]), part_size=1024)
    assert Digest(exp).check("s3://b/k", 0) == "etag-multipart"


def test_per_part_claims_need_the_part_size_and_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="needs the part size"):
        Digest(Expectation("etag-multipart", "abc-2"))
    with pytest.raises(ValueError, match="no hasher for rot13"):
        Digest(Expectation("rot13", "x"))
    assert is_per_part(Expectation("etag-multipart", "abc"))  # always, whatever the value looks like
    assert not is_per_part(Expectation("md5", "abc"))


# == checking ================================================================================


def test_every_claim_is_checked_and_the_message_names_each_failure():
    sha, md5 = hashlib.sha256(BODY).hexdigest(), hashlib.md5(BODY).hexdigest()
    good, bad = Expectation("sha256", sha), Expectation("md5", "0" * 32)
    d = feed(Digest(good, also=(bad, good)), BODY, 9999)
    with pytest.raises(DigestMismatch) as ei:
        d.check("s3://b/k", len(BODY))
    assert ei.value.failed == [(bad, md5)] and ei.value.passed == [(good, sha)]
    assert str(ei.value) == f"s3://b/k: md5 is {md5} (base64 {_b64(md5)}), expected {'0' * 32} (base64 {_b64('0' * 32)})"
    assert isinstance(ei.value, ChecksumMismatch)


def test_the_size_is_checked_first_and_alone_verifies_as_size():
    d = feed(Digest(None), BODY, 4096)
    assert d.check("s3://b/k", len(BODY)) == "size"
    with pytest.raises(ChecksumMismatch) as ei:
        d.check("s3://b/k", len(BODY) + 1)
    assert str(ei.value) == f"s3://b/k: got {len(BODY)} bytes, expected {len(BODY) + 1}"
    assert d.local_crc32c == format(crc32c.crc32c(BODY), "08x")


def test_digest_file_reads_from_the_start_in_chunks(tmp_path):
    data = BODY * (2 * CHUNK // len(BODY) + 1)  # more than two chunks
    f = io.BytesIO(data)
    f.seek(0, io.SEEK_END)  # wherever the file stands, the whole of it is read
    exp = Expectation("sha256", hashlib.sha256(data).hexdigest())
    d = digest_file(f, exp, also=(Expectation("crc32c", format(crc32c.crc32c(data), "08x")),))
    assert d.nbytes == len(data)
    assert d.check("s3://b/k", len(data)) == "sha256"
    p = tmp_path / "f"
    p.write_bytes(data)
    assert local_crc32c_of(str(p)) == format(crc32c.crc32c(data), "08x")
    p.write_bytes(b"")
    assert local_crc32c_of(str(p)) == "00000000"


def test_have_crc64nvme_says_whether_awscrt_is_there():
    assert have_crc64nvme() == (importlib.util.find_spec("awscrt") is not None)


# == joining CRCs ============================================================================


@pytest.mark.parametrize("method,crc", [("crc32c", crc32c.crc32c), ("s3-crc32c", crc32c.crc32c),
                                        ("s3-crc32", zlib.crc32)])
def test_parts_in_any_order_join_for_manifest_and_s3_crcs(method, crc):
    split = SplitDigest(Expectation(method, format(crc(BODY), "08x")))
    cuts = [0, 1, 4096, 4097, 30_000, len(BODY)]
    for a, b in reversed(list(zip(cuts, cuts[1:]))):
        split.done(a, feed(split.part(), BODY[a:b], 1000))
    joined = split.joined()
    assert joined.check("s3://b/k", len(BODY)) == method
    assert joined.local_crc32c == format(crc32c.crc32c(BODY), "08x")


def test_parts_that_do_not_meet_are_refused():
    split = SplitDigest(None)
    split.done(0, feed(split.part(), BODY[:100], 100))
    split.done(101, feed(split.part(), BODY[101:200], 100))
    with pytest.raises(ValueError, match="one ends at 100, the next starts at 101"):
        split.joined()


@pytest.mark.parametrize("poly,width,crc", [(0xEDB88320, 32, zlib.crc32), (0x82F63B78, 32, crc32c.crc32c)])
def test_a_combiner_built_for_a_polynomial_joins_its_crcs(poly, width, crc):
    comb = _Combiner(poly, width)
    for a, b in [(b"", b""), (b"x", b""), (b"", b"y"), (BODY[:777], BODY[777:]), (BODY, BODY[:1 << 12])]:
        assert comb.combine(crc(a), crc(b), len(b)) == crc(a + b)


# == a claim beside the strongest is checked on every path: streamed, split into parts, read back =====


def test_two_failed_claims_are_both_named():
    d = feed(Digest(Expectation("sha256", "0" * 64), also=(Expectation("md5", "1" * 32),)), BODY, 9999)
    with pytest.raises(DigestMismatch) as ei:
        d.check("s3://b/k", None)
    sha, md5 = hashlib.sha256(BODY).hexdigest(), hashlib.md5(BODY).hexdigest()
    assert str(ei.value) == (f"s3://b/k: sha256 is {sha} (base64 {_b64(sha)}), expected {'0' * 64} (base64 {_b64('0' * 64)}); "
                             f"md5 is {md5} (base64 {_b64(md5)}), expected {'1' * 32} (base64 {_b64('1' * 32)})")


def test_split_parts_check_the_manifest_claim_beside_s3s():
    s3s = Expectation("s3-crc32", format(zlib.crc32(BODY), "08x"))
    for manifest, ok in [(Expectation("crc32c", format(crc32c.crc32c(BODY), "08x")), True),
                         (Expectation("crc32c", "00000000"), False)]:
        split = SplitDigest(s3s, also=(manifest,))
        split.done(20_000, feed(split.part(), BODY[20_000:], 4096))
        split.done(0, feed(split.part(), BODY[:20_000], 4096))
        joined = split.joined()
        if ok:
            assert joined.check("s3://b/k", len(BODY)) == "s3-crc32"
            assert [e for e, _ in joined.actual()] == [s3s, manifest]
        else:
            with pytest.raises(DigestMismatch) as ei:
                joined.check("s3://b/k", len(BODY))
            assert [e for e, _ in ei.value.failed] == [manifest]


def test_digest_file_checks_the_manifest_claim_beside_s3s():
    s3s = Expectation("s3-sha256", hashlib.sha256(BODY).hexdigest())
    wrong = Expectation("md5", "0" * 32)
    with pytest.raises(DigestMismatch) as ei:
        digest_file(io.BytesIO(BODY), s3s, also=(wrong,)).check("s3://b/k", len(BODY))
    assert [e for e, _ in ei.value.failed] == [wrong]


def _b64(hexdigest: str) -> str:
    """The base64 form a mismatch message shows beside the hex (S3 and many manifests write base64)."""
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


def test_an_upload_whose_last_declared_part_is_empty_counts_that_part():
    exp = Expectation("etag-multipart", multipart_etag([BODY[:5000], BODY[5000:], b""]),
                      part_sizes=(5000, len(BODY) - 5000, 0))
    assert feed(Digest(exp), BODY, 3000).check("s3://b/k", len(BODY)) == "etag-multipart"
    two = Expectation("etag-multipart", multipart_etag([BODY[:5000], BODY[5000:]]),
                      part_sizes=(5000, len(BODY) - 5000, 0))
    with pytest.raises(DigestMismatch):  # the same bytes as two parts are another ETag
        feed(Digest(two), BODY, 3000).check("s3://b/k", len(BODY))


def test_a_multipart_etag_mismatch_is_named_in_hex_only():
    from s3cache.fetch.checksum import describe_mismatch

    whole = describe_mismatch(Expectation("md5", "00" * 16), "ff" * 16)
    assert whole == f"md5 is {'ff' * 16} (base64 /////////////////////w==), expected {'00' * 16} " \
                    "(base64 AAAAAAAAAAAAAAAAAAAAAA==)"
    etag = describe_mismatch(Expectation("etag-multipart", "00" * 16), "ff" * 16)
    assert etag == f"etag-multipart is {'ff' * 16}, expected {'00' * 16}"
