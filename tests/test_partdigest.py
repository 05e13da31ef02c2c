"""Digests of an object fetched in parts (s3cache.fetch.partdigest), pure: CRCs joined from parts that
stream in any order (SplitDigest), and an MD5 fed in byte order from parts that stream in parallel
(InOrderDigest), with real files. What the fetcher relies on: the joined or in-order digest is the
digest of the whole object, a failed attempt leaves nothing behind, and bytes are read back only when
they landed ahead of the hash."""

from __future__ import annotations

import hashlib
import os
import zlib

import pytest

from s3cache.errors import ChecksumMismatch
from s3cache.fetch.checksum import CHUNK, Digest, Expectation, local_crc32c_of
from s3cache.fetch.partdigest import InOrderDigest, SplitDigest

BODY = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes, not a multiple of any part size below


def crc32(data: bytes) -> Expectation:
    return Expectation("s3-crc32", format(zlib.crc32(data), "08x"))


def md5(data: bytes) -> Expectation:
    return Expectation("md5", hashlib.md5(data).hexdigest())


def split_in(expect, body: bytes, cuts: list[int], also=(), order=None) -> SplitDigest:
    """Feed ``body`` cut at ``cuts`` to a SplitDigest, finishing the parts in ``order`` (indexes)."""
    bounds = list(zip([0, *cuts], [*cuts, len(body)]))
    split = SplitDigest(expect, also)
    for i in order if order is not None else range(len(bounds)):
        start, end = bounds[i]
        d = split.part()
        d.update(body[start:end])
        split.done(start, d)
    return split


# --- SplitDigest -------------------------------------------------------------------------------------


def test_splittable_needs_every_claim_to_be_a_whole_object_crc():
    whole = crc32(BODY)
    assert SplitDigest.splittable(None) and SplitDigest.splittable(whole, also=(whole,))
    assert SplitDigest.splittable(None, also=(Expectation("crc32c", "00000000"),))
    # one claim that needs the bytes in order (or per upload part) is enough to refuse
    assert not SplitDigest.splittable(whole, also=(md5(BODY),))
    assert not SplitDigest.splittable(None, also=(Expectation("s3-crc32", "00000000-2"),))
    assert not SplitDigest.splittable(md5(BODY), also=(whole,))


def test_joined_parts_check_like_the_whole_object_and_carry_its_local_crc32c(tmp_path):
    whole = Digest(crc32(BODY))
    whole.update(BODY)
    (tmp_path / "f").write_bytes(BODY)
    joined = split_in(crc32(BODY), BODY, [100, 4096, 10000], order=[2, 0, 3, 1]).joined()
    assert joined.nbytes == len(BODY)
    assert joined.check("x", len(BODY)) == "s3-crc32"
    assert joined.actual() == whole.actual()
    assert joined.local_crc32c == whole.local_crc32c == local_crc32c_of(str(tmp_path / "f"))


def test_joined_parts_check_every_claim_and_name_the_one_that_fails():
    manifest = Expectation("crc32c", "deadbeef")  # wrong: the manifest disagrees with S3's claim
    joined = split_in(crc32(BODY), BODY, [5000], also=(manifest,), order=[1, 0]).joined()
    with pytest.raises(ChecksumMismatch, match="deadbeef"):
        joined.check("s3://b/k", len(BODY))
    ok = Expectation("crc32c", local_crc32c_of_bytes(BODY))
    assert split_in(crc32(BODY), BODY, [5000], also=(ok,)).joined().check("x", len(BODY)) == "s3-crc32"


def local_crc32c_of_bytes(data: bytes) -> str:
    d = Digest(None)
    d.update(data)
    return d.local_crc32c


def test_with_no_claim_the_joined_parts_verify_by_size_and_still_give_the_local_crc32c():
    joined = split_in(None, BODY, [1, 2, 3000], order=[3, 1, 2, 0]).joined()
    assert joined.check("x", len(BODY)) == "size"
    assert joined.local_crc32c == local_crc32c_of_bytes(BODY)
    with pytest.raises(ChecksumMismatch, match="got 10244 bytes, expected 10245"):
        joined.check("x", len(BODY) + 1)


def test_no_parts_join_to_the_empty_object():
    joined = SplitDigest(crc32(b"")).joined()
    assert joined.nbytes == 0 and joined.check("x", 0) == "s3-crc32"
    assert joined.local_crc32c == local_crc32c_of_bytes(b"")


def test_a_part_done_twice_counts_once_and_the_last_attempt_wins():
    split = SplitDigest(crc32(BODY))
    bad = split.part()
    bad.update(b"\0" * 5000)  # an attempt whose bytes were wrong, then retried
    split.done(0, bad)
    good = split.part()
    good.update(BODY[:5000])
    split.done(0, good)
    rest = split.part()
    rest.update(BODY[5000:])
    split.done(5000, rest)
    assert split.joined().check("x", len(BODY)) == "s3-crc32"


@pytest.mark.parametrize("starts", [[0, 6000], [0, 4000], [100]])
def test_parts_with_a_gap_an_overlap_or_no_start_are_refused(starts):
    split = SplitDigest(None)
    for s in starts:
        d = split.part()
        d.update(BODY[s:s + 5000])
        split.done(s, d)
    with pytest.raises(ValueError, match="parts do not meet"):
        split.joined()


# --- InOrderDigest -----------------------------------------------------------------------------------


class File:
    """A temp file the parts are written into, as the fetcher does: bytes land, then the digest hears."""

    def __init__(self, path, size: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(self.fd, size)

    def write(self, a: InOrderDigest.Attempt, data: bytes) -> None:
        os.pwrite(self.fd, data, a.offset)
        a.update(data)


@pytest.fixture
def file(tmp_path):
    f = File(tmp_path / "tmp", 0)
    yield f
    os.close(f.fd)


def test_parts_streaming_in_order_are_hashed_as_they_arrive_with_no_read_back(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    for start in range(0, len(BODY), 4096):
        a = d.attempt(start)
        for at in range(start, min(start + 4096, len(BODY)), 1000):
            file.write(a, BODY[at:min(at + 1000, start + 4096, len(BODY))])
            assert d.frontier == a.offset
        d.finished(a)
    assert d.readback == 0 and d.frontier == len(BODY)
    assert d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_a_part_that_started_ahead_is_read_back_up_to_where_it_is_then_hashed_as_it_streams(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    first, second = d.attempt(0), d.attempt(5000)
    file.write(second, BODY[5000:6000])  # ahead of the frontier: only written
    assert d.frontier == 0 and d.readback == 0
    file.write(first, BODY[:5000])  # the frontier reaches the start of the second part
    assert d.frontier == 5000 and d.readback == 0
    file.write(second, BODY[6000:8000])  # reads back what it wrote before, then hashes this
    assert d.frontier == 8000 and d.readback == 1000
    file.write(second, BODY[8000:])
    d.finished(first)
    d.finished(second)
    assert d.readback == 1000 and d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_a_failed_attempt_is_taken_back_out_of_the_hash_and_its_retry_hashed_afresh(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    first, second = d.attempt(0), d.attempt(5000)
    file.write(first, BODY[:5000])
    d.finished(first)
    file.write(second, b"\xff" * 1000)  # wrong bytes hashed as they stream, then the attempt fails
    assert d.frontier == 6000
    d.failed(second)
    assert (d.frontier, d.readback) == (5000, 0)
    d.failed(second)  # a second call changes nothing
    assert d.frontier == 5000
    retry = d.attempt(5000)
    file.write(retry, BODY[5000:])
    d.finished(retry)
    assert d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_a_failed_attempt_that_had_read_back_restores_the_read_back_count(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    first, second = d.attempt(0), d.attempt(5000)
    file.write(second, BODY[5000:7000])
    file.write(first, BODY[:5000])
    d.finished(first)
    file.write(second, b"\xff" * 100)  # reads back 2000 bytes, then hashes the bad chunk
    assert (d.frontier, d.readback) == (7100, 2000)
    d.failed(second)
    assert (d.frontier, d.readback) == (5000, 0)
    retry = d.attempt(5000)
    file.write(retry, BODY[5000:])
    d.finished(retry)
    assert d.readback == 0 and d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_an_attempt_that_never_fed_the_hash_fails_without_touching_it(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    first, ahead = d.attempt(0), d.attempt(5000)
    file.write(first, BODY[:3000])
    file.write(ahead, b"\xff" * 100)  # ahead of the frontier: never hashed
    d.failed(ahead)
    assert (d.frontier, d.readback) == (3000, 0)
    file.write(first, BODY[3000:5000])
    retry = d.attempt(5000)
    file.write(retry, BODY[5000:])
    d.finished(first)
    d.finished(retry)
    assert d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_finished_parts_are_consumed_in_order_once_the_frontier_reaches_them(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    parts = [(0, 3000), (3000, 6000), (6000, 9000), (9000, len(BODY))]
    attempts = [d.attempt(s) for s, _ in parts]
    for i in (3, 1, 2):  # all but the first land, out of order
        file.write(attempts[i], BODY[parts[i][0]:parts[i][1]])
        d.finished(attempts[i])
    assert d.frontier == 0 and d.readback == 0
    file.write(attempts[0], BODY[:3000])
    assert d.frontier == 3000
    d.finished(attempts[0])  # the frontier runs through the three that are waiting
    assert d.frontier == len(BODY) and d.readback == len(BODY) - 3000
    assert d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_a_part_the_frontier_already_passed_is_not_hashed_again(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    whole = d.attempt(0)
    file.write(whole, BODY)
    late = d.attempt(4000)  # a duplicate attempt at a range already hashed
    late.update(BODY[4000:5000])
    d.finished(late)
    d.finished(whole)
    assert d.frontier == len(BODY) and d.result(len(BODY)).check("x", len(BODY)) == "md5"


def test_read_back_stops_at_the_part_even_when_the_file_goes_on(tmp_path):
    # The file is larger than what the parts cover so far: a read back must stop at the part's end.
    body = os.urandom(CHUNK + CHUNK // 2)
    f = File(tmp_path / "tmp", 0)
    try:
        os.pwrite(f.fd, b"\xee" * (3 * CHUNK), 0)  # stale bytes beyond the object
        d = InOrderDigest(Digest(md5(body)), f.fd)
        front, back = d.attempt(0), d.attempt(1000)
        f.write(back, body[1000:])
        d.finished(back)
        f.write(front, body[:1000])
        d.finished(front)
        assert d.frontier == len(body) and d.readback == len(body) - 1000
        assert d.result(len(body)).check("x", len(body)) == "md5"
    finally:
        os.close(f.fd)


def test_a_temp_file_shorter_than_a_finished_part_is_a_mismatch(tmp_path):
    f = File(tmp_path / "tmp", 0)
    try:
        d = InOrderDigest(Digest(md5(BODY)), f.fd)
        back = d.attempt(5000)
        back.update(BODY[5000:])  # says it wrote, but nothing landed in the file
        d.finished(back)
        front = d.attempt(0)
        f.write(front, BODY[:5000])
        with pytest.raises(ChecksumMismatch, match="the temp file ends at 5000, before 10244"):
            d.finished(front)
    finally:
        os.close(f.fd)


def test_the_result_needs_every_byte_hashed(file):
    d = InOrderDigest(Digest(md5(BODY)), file.fd)
    a = d.attempt(0)
    file.write(a, BODY[:9000])
    with pytest.raises(ChecksumMismatch, match="reach byte 9000, not 10244"):
        d.result(len(BODY))
    file.write(a, BODY[9000:])
    d.finished(a)
    got = d.result(len(BODY))
    assert got is d.digest and got.nbytes == len(BODY)
    bad = InOrderDigest(Digest(md5(BODY)), file.fd)
    b = bad.attempt(0)
    file.write(b, BODY[:-1] + b"!")
    with pytest.raises(ChecksumMismatch):
        bad.result(len(BODY)).check("x", len(BODY))


def test_a_multipart_etag_hashed_in_order_forgets_a_failed_attempt_that_crossed_an_upload_part(file):
    # The attempt fails after it fed bytes across the upload's part boundary (4096): the part MD5s it
    # completed must be taken back out with the rest, or the retry's ETag would count them twice.
    parts = [BODY[:4096], BODY[4096:8192], BODY[8192:]]
    etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    d = InOrderDigest(Digest(Expectation("etag-multipart", etag, part_size=4096),
                             also=(crc32(BODY),)), file.fd)
    first = d.attempt(0)
    file.write(first, BODY[:3000])
    d.finished(first)
    second = d.attempt(3000)
    file.write(second, BODY[3000:6000])
    d.failed(second)
    assert d.frontier == 3000
    retry = d.attempt(3000)
    file.write(retry, BODY[3000:])
    d.finished(retry)
    assert d.result(len(BODY)).check("x", len(BODY)) == "etag-multipart"
