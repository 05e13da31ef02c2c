"""The manifest's contract at its edges: what each bad line says (the user's only clue), where a read error
points, which listed objects are skipped and how they are shown. Written to kill the mutants mutmut found
alive in manifest.py (issue 21); every assertion is about behaviour a user or the daemon relies on."""

import logging
import os

import pytest

from s3cache.errors import ManifestError, UnsafeKey
from s3cache.manifest.parse import (
    MAX_OBJECT_SIZE,
    Entry,
    Listed,
    Prefix,
    SkipLog,
    expand,
    parse,
    parse_line,
    read,
    read_open,
    shown_uri,
)
from s3cache.manifest.refs import ObjectRef, check_key


def reason(line: str) -> str:
    with pytest.raises(ManifestError) as ei:
        list(parse([line], "m.txt"))
    assert ei.value.line == 1 and str(ei.value) == f"m.txt:1: {ei.value.reason}"
    return ei.value.reason


# The messages users read, word for word: a bad line's message is all they get to fix it with.
@pytest.mark.parametrize("line,want", [
    ("s3://bkt/k colour=red",
     "unknown field 'colour' (known: size, sha256, md5, crc32c, crc64nvme, crc32, version, pin)"),
    ("s3://bkt/train/ size=3 md5=00000000000000000000000000000000",
     "a prefix line takes only pin=, not md5, size"),
    ("s3://bkt/100%",
     "a '%' in a key must be followed by two hex digits (write '%' itself as %25)"),
    ("s3://bkt/k size=abc", "size= must be a whole number of bytes, got 'abc'"),
    ("s3://bkt/k version=", "expected NAME=VALUE after the URI, got 'version='"),
    ("s3://bkt/k =v1", "unknown field '' (known: size, sha256, md5, crc32c, crc64nvme, crc32, version, pin)"),
])
def test_bad_line_messages_word_for_word(line, want):
    assert reason(line) == want


def test_a_field_without_a_value_is_refused_not_taken_as_empty():
    # version= with nothing after it would otherwise fetch version "" (S3 takes that for no version).
    for f in ("version=", "size=", "pin=", "sha256="):
        assert reason(f"s3://bkt/k {f}") == f"expected NAME=VALUE after the URI, got {f!r}"


def test_a_long_bad_size_is_shown_shortened_and_a_short_one_whole():
    forty = "x" * 40
    assert reason(f"s3://bkt/k size={forty}") == f"size= must be a whole number of bytes, got {forty!r}"
    long = "y" * 20 + "z" * 21
    assert reason(f"s3://bkt/k size={long}") == \
        f"size= must be a whole number of bytes, got {'y' * 20 + '...(41 characters)'!r}"


def test_a_too_big_size_is_shown_whole_up_to_forty_digits_then_by_its_length():
    forty = "9" * 40
    assert reason(f"s3://bkt/k size={forty}") == \
        f"size= is {forty}, more than S3's largest object ({MAX_OBJECT_SIZE} bytes, 5 TiB)"
    assert reason(f"s3://bkt/k size={'9' * 41}") == \
        f"size= is a number of 41 digits, more than S3's largest object ({MAX_OBJECT_SIZE} bytes, 5 TiB)"
    # leading zeros are not digits of the number: they neither count nor show
    assert reason(f"s3://bkt/k size=000{MAX_OBJECT_SIZE + 1}") == \
        f"size= is {MAX_OBJECT_SIZE + 1}, more than S3's largest object ({MAX_OBJECT_SIZE} bytes, 5 TiB)"


def test_leading_zeros_do_not_make_a_size_too_big():
    e = parse_line("s3://bkt/k size=" + "0" * 60 + "7")
    assert e.size == 7


@pytest.mark.parametrize("value", ["zz", "AAA*AAQ==", "AAA-AAQ==", "AAA.AAQ=="])
def test_a_checksum_that_is_neither_hex_nor_strict_base64_is_refused(value):
    # A lenient decoder would drop the stray characters and take what is left ("AAAAAQ==") for the
    # checksum; one that cannot be decoded at all must not become some checksum either.
    with pytest.raises(ValueError, match="crc32c= must be 8 hex digits or base64 of 4 bytes"):
        parse_line(f"s3://bkt/k crc32c={value}")


def test_a_comment_may_itself_hold_a_hash_sign():
    assert parse_line("s3://bkt/k size=3 # see #12 and #13") == Entry(ObjectRef("bkt", "k"), 3)


def test_parse_names_an_unnamed_source_manifest():
    with pytest.raises(ManifestError) as ei:
        list(parse(["s3://bkt/k", "nonsense"]))
    assert str(ei.value) == "<manifest>:2: expected s3://bucket/key, got 'nonsense'"


def test_read_names_the_file_and_line_of_a_bad_line(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("s3://bkt/a\ns3://bkt/b colour=red\n")
    with pytest.raises(ManifestError) as ei:
        list(read(str(p)))
    assert (ei.value.path, ei.value.line) == (str(p), 2)
    assert str(ei.value).startswith(f"{p}:2: unknown field 'colour'")


def test_a_non_utf8_first_byte_is_on_line_1_byte_1(tmp_path):
    p = tmp_path / "m.txt"
    p.write_bytes(b"\xffs3://bkt/k\n")
    with pytest.raises(ManifestError) as ei:
        list(read(str(p)))
    assert ei.value.line == 1
    assert str(ei.value) == f"{p}:1: not UTF-8 text: byte 1 of the line (invalid start byte)"


def test_a_non_utf8_byte_in_a_pipe_is_reported_without_a_line():
    # A pipe cannot be read again to find the line: the error says so by naming none, and no byte.
    r, w = os.pipe()
    os.write(w, b"s3://bkt/a\ns3://bkt/\xff\n")
    os.close(w)
    with open(r, encoding="utf-8") as f:
        with pytest.raises(ManifestError) as ei:
            list(read_open(f, "<stdin>"))
    assert ei.value.line is None
    assert str(ei.value) == "<stdin>: not UTF-8 text (invalid start byte)"


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_a_read_error_mid_file_is_a_manifest_error_without_a_line():
    # /proc/self/mem opens, then fails to read at offset 0 (EIO): an error after open, not at it.
    with pytest.raises(ManifestError) as ei:
        list(read("/proc/self/mem"))
    assert ei.value.path == "/proc/self/mem" and ei.value.line is None
    assert str(ei.value) == "/proc/self/mem: cannot read manifest: Input/output error"


# == listed objects: the checks, the log, what is kept ==========================================


def listing(*objs):
    return lambda bucket, prefix: list(objs)


def test_a_listed_size_of_exactly_5_tib_is_kept_and_one_byte_more_is_skipped():
    skips = SkipLog()
    got = list(expand([Prefix("bkt", "p/")], listing(Listed("p/a", MAX_OBJECT_SIZE, "e"),
                                                       Listed("p/b", MAX_OBJECT_SIZE + 1, "e")), skips))
    assert got == [Entry(ObjectRef("bkt", "p/a"), MAX_OBJECT_SIZE, size_is_hint=True)]
    assert skips.items[0].reason == f"the listing gives size {MAX_OBJECT_SIZE + 1}, not between 0 and " \
                                    f"{MAX_OBJECT_SIZE} bytes"


def _nul_key_with_message_of(length: int) -> str:
    """A key under p/ holding a NUL whose check_key message is ``length`` characters long."""
    for m in range(length):
        key = "p/" + "x" * m + "\x00"
        with pytest.raises(UnsafeKey) as ei:
            check_key(key)
        if len(str(ei.value)) == length:
            return key
    raise AssertionError(f"no key gives a {length}-character message")


def test_a_skip_reason_is_the_key_check_message_up_to_120_characters_then_its_gist():
    short, long = _nul_key_with_message_of(120), _nul_key_with_message_of(121)
    skips = SkipLog()
    assert list(expand([Prefix("bkt", "p/")], listing(Listed(short, 1, "e"), Listed(long, 1, "e")), skips)) == []
    with pytest.raises(UnsafeKey) as ei:
        check_key(short)
    assert [s.reason for s in skips.items] == [str(ei.value), "key contains a NUL byte"]


def test_skips_are_kept_up_to_100_and_logged_up_to_10_then_counted_once(caplog):
    caplog.set_level(logging.WARNING, logger="s3cache.manifest")
    bad = [Listed(f"p/{i}\x00", 1, "e") for i in range(150)]
    skips = SkipLog()
    assert list(expand([Prefix("bkt", "p/")], listing(*bad), skips)) == []
    assert skips.count == 150 and len(skips.items) == 100
    assert skips.items[0].uri == "s3://bkt/p/0\\x00"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 11
    assert msgs[0] == "skipping listed object s3://bkt/p/0\\x00: key contains a NUL byte: 'p/0\\x00'"
    assert msgs[-1] == "skipped 150 listed object(s) in all (the first 10 are logged above)"


@pytest.mark.parametrize("n", [0, 9, 10])
def test_no_count_line_when_every_skip_was_logged(caplog, n):
    caplog.set_level(logging.WARNING, logger="s3cache.manifest")
    skips = SkipLog()
    list(expand([Prefix("bkt", "p/")], listing(*[Listed(f"p/{i}\x00", 1, "e") for i in range(n)]), skips))
    assert len(caplog.records) == n
    assert not any("in all" in r.getMessage() for r in caplog.records)


def test_a_skip_log_that_logs_nothing_adds_no_count_line(caplog):
    caplog.set_level(logging.WARNING, logger="s3cache.manifest")
    skips = SkipLog(log_first=0)  # listing.py's: its caller shows the skips itself
    for i in range(3):
        skips.add("bkt", f"k{i}\x00", "bad")
    skips.close()
    assert caplog.records == [] and skips.count == 3


def test_shown_uri_keeps_printable_keys_as_they_are():
    assert shown_uri("bkt", "a\\b 'c\" d") == "s3://bkt/a\\b 'c\" d"
    assert shown_uri("bkt", "a\tb") == "s3://bkt/a\\tb"


def test_shown_uri_shortens_past_200_characters_and_gives_the_key_length_in_bytes():
    assert shown_uri("bkt", "k" * 200) == "s3://bkt/" + "k" * 200
    assert shown_uri("bkt", "é" * 201) == "s3://bkt/" + "é" * 200 + "...(402 bytes)"
    assert shown_uri("bkt", "k" * 12, limit=10) == "s3://bkt/" + "k" * 10 + "...(12 bytes)"


def test_a_size_of_many_leading_zeros_is_still_its_number():
    assert parse_line("s3://bkt/k size=" + "0" * 20).size == 0  # past the fast path: no digits left
    assert parse_line("s3://bkt/k size=" + "0" * 20 + "42").size == 42
