"""s3:// URIs and keys at their edges (issue 21, mutants mutmut found alive in refs.py): what a URI parses
to, S3's key length limit exactly, and the message each refusal gives."""

import pytest

from s3cache.errors import UnsafeKey
from s3cache.manifest.refs import (
    MAX_KEY_BYTES,
    ObjectRef,
    check_key,
    decode_key,
    encode_key,
    format_uri,
    from_identity,
    make_ref,
    parse_uri,
    printable,
    shown,
)


def refusal(fn, *args) -> str:
    with pytest.raises(UnsafeKey) as ei:
        fn(*args)
    return str(ei.value)


def test_a_uri_splits_at_the_first_slash_and_keeps_the_rest_of_the_key():
    assert parse_uri("s3://bkt/a/b/c.txt") == ObjectRef("bkt", "a/b/c.txt")
    assert parse_uri("s3://bkt/a//b/") == ObjectRef("bkt", "a//b/")
    assert make_ref("bkt", "x/y") == ObjectRef("bkt", "x/y")


def test_a_key_of_exactly_1024_bytes_is_allowed_and_1025_is_not():
    at_limit = "é" * (MAX_KEY_BYTES // 2)
    assert len(at_limit.encode()) == MAX_KEY_BYTES
    assert check_key(at_limit) == at_limit
    assert parse_uri(f"s3://bkt/{at_limit}").key == at_limit
    assert refusal(check_key, at_limit + "x") == f"key is {MAX_KEY_BYTES + 1} bytes, S3 allows at most {MAX_KEY_BYTES}"


def test_refusals_say_what_is_wrong():
    assert refusal(check_key, "") == "empty key"
    assert refusal(parse_uri, "http://bkt/k") == "not an s3:// URI: 'http://bkt/k'"
    assert refusal(parse_uri, b"s3://bkt/k") == "not an s3:// URI: b's3://bkt/k'"
    for uri in ("s3://bkt", "s3://bkt/"):
        assert refusal(parse_uri, uri) == f"URI names no object (s3://bucket/key expected): {uri!r}"


# -- the two forms of a key: what users write and read, and the identity ---------------------------

@pytest.mark.parametrize("written, key", [
    ("plain/key.bin", "plain/key.bin"),
    ("a%20b", "a b"),
    ("%23%25", "#%"),
    ("a%41", "aA"),
    ("x%2fy%2Fz", "x/y/z"),  # either case of hex
    ("%e2%82%ac", "€"),  # the UTF-8 bytes of one character
    ("é%20ü", "é ü"),  # raw non-ASCII beside an escape
    ("100%", "100%"),  # a '%' not followed by two hex digits is itself
    ("%zz%4", "%zz%4"),
    ("50%%41", "50%A"),
])
def test_a_written_key_decodes_each_percent_escape_to_its_byte(written, key):
    assert decode_key(written) == key
    assert parse_uri(f"s3://bucket/{written}") == ObjectRef("bucket", key)


@pytest.mark.parametrize("written", ["%ff", "a%C3", "%e2%82"])
def test_escapes_that_are_not_utf8_are_refused_naming_the_key(written):
    with pytest.raises(UnsafeKey, match=f"percent-encoded key '{written}' is not valid UTF-8"):
        decode_key(written)


@pytest.mark.parametrize("key, written", [
    ("plain/key.bin", "plain/key.bin"),
    ("é/ü", "é/ü"),  # needs no quoting: left as it is
    ("a b/c", "a%20b/c"),  # quoted as a whole, slashes kept
    ("a#b", "a%23b"),
    ("50%", "50%25"),
    ("tab\there", "tab%09here"),
    ("é b", "%C3%A9%20b"),
    ("zero\u200bwidth", "zero%E2%80%8Bwidth"),
    ("del\x7f", "del%7F"),
])
def test_a_key_is_displayed_as_a_manifest_writes_it_and_reads_back(key, written):
    assert encode_key(key) == written
    assert decode_key(written) == key
    assert ObjectRef("bucket", key).display == f"s3://bucket/{written}"


def test_format_uri_takes_a_ref_or_an_identity_and_never_decodes_the_identity():
    assert format_uri(ObjectRef("bucket", "a b")) == "s3://bucket/a%20b"
    assert format_uri("s3://bucket/a%41") == "s3://bucket/a%2541"  # the raw key is "a%41", not "aA"
    assert from_identity("s3://bucket/a%41") == ObjectRef("bucket", "a%41")
    with pytest.raises(UnsafeKey, match="not an s3:// URI"):
        format_uri("bucket/key")


@pytest.mark.parametrize("text, out", [
    ("s3://b/é ok", "s3://b/é ok"),
    ("a\nb", "a\\nb"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("line\u2028sep", "line\\u2028sep"),
    ("\r\t", "\\r\\t"),
    ("back\\slash\n", "back\\slash\\n"),  # a printable backslash is left as one
])
def test_printable_escapes_what_would_forge_a_log_line_or_drive_a_terminal(text, out):
    assert printable(text) == out
    assert shown(text) == out


def test_shown_prints_a_refs_identity():
    assert shown(ObjectRef("bucket", "k\n")) == "s3://bucket/k\\n"
