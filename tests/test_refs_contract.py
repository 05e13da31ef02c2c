"""s3:// URIs and keys at their edges (issue 21, mutants mutmut found alive in refs.py): what a URI parses
to, S3's key length limit exactly, and the message each refusal gives."""

import pytest

from s3cache.errors import UnsafeKey
from s3cache.manifest.refs import MAX_KEY_BYTES, ObjectRef, check_key, make_ref, parse_uri


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
