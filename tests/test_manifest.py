import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.errors import ManifestError
from s3cache.manifest import Entry, Listed, Prefix, expand, parse, read
from s3cache.refs import ObjectRef


def one(text):
    items = list(parse([text], "m.txt"))
    assert len(items) == 1
    return items[0]


def test_plain_line_and_fields():
    sha = hashlib.sha256(b"x").hexdigest()
    e = one(f"s3://b1k/train/a.tfrecord size=12 sha256={sha} version=v1 pin=1")
    assert e == Entry(ObjectRef("b1k", "train/a.tfrecord"), 12, sha256=sha, version="v1", pin=True)


def test_base64_checksums_are_normalised_to_hex():
    md5 = hashlib.md5(b"x").digest()
    e = one(f"s3://bkt/k md5={base64.b64encode(md5).decode()} crc32c=AAAAAQ==")
    assert e.md5 == md5.hex()
    assert e.crc32c == "00000001"
    assert one("s3://bkt/k crc32c=DEADBEEF").crc32c == "deadbeef"


def test_comments_blank_lines_and_percent_encoding():
    items = list(parse(["# header", "", "   ", "s3://bkt/a%20b%23c%25d.txt  # trailing", "s3://bkt/é/ü"], "m"))
    assert [i.ref.key for i in items] == ["a b#c%d.txt", "é/ü"]


def test_prefix_lines():
    assert one("s3://bkt/train/") == Prefix("bkt", "train/")
    assert one("s3://bkt/ pin=1") == Prefix("bkt", "", True)
    with pytest.raises(ManifestError, match="prefix line takes only pin"):
        one("s3://bkt/train/ size=3")


@pytest.mark.parametrize("line,problem", [
    ("http://bkt/key", "expected s3://bucket/key"),
    ("s3://bkt", "a whole bucket is written"),
    ("s3://BAD..name/k", "invalid bucket name"),
    ("s3://.hidden/k", "invalid bucket name"),
    ("s3://bkt/k size=-1", "size= must be a whole number"),
    ("s3://bkt/k size=1.5", "size= must be a whole number"),
    ("s3://bkt/k sha256=abc", "sha256= must be 64 hex digits"),
    ("s3://bkt/k md5=zz", "md5= must be 32 hex digits"),
    ("s3://bkt/k colour=red", "unknown field 'colour'"),
    ("s3://bkt/k size=1 size=2", "given twice"),
    ("s3://bkt/k size", "expected NAME=VALUE"),
    ("s3://bkt/k pin=yes", "pin= must be 0 or 1"),
    ("s3://bkt/100%", "must be followed by two hex digits"),
    ("s3://bkt/%ff%fe", "not valid UTF-8"),
    ("s3://bkt/%00", "NUL"),
])
def test_bad_lines_name_file_line_and_problem(line, problem):
    with pytest.raises(ManifestError) as ei:
        list(parse(["# ok", "s3://bkt/fine", line], "data/m.txt"))
    assert ei.value.path == "data/m.txt"
    assert ei.value.line == 3
    assert problem in str(ei.value)
    assert str(ei.value).startswith("data/m.txt:3: ")


def test_read_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        list(read(str(tmp_path / "nope.txt")))


def test_read_not_utf8(tmp_path):
    p = tmp_path / "m.txt"
    p.write_bytes(b"s3://bkt/\xff\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        list(read(str(p)))


def test_expand_lists_prefixes_in_place_and_skips_folder_markers():
    calls = []

    def lister(bucket, prefix):
        calls.append((bucket, prefix))
        return [Listed("p/a", 1, "e"), Listed("p/dir/", 0, "e"), Listed("p/b", 2, "e")]

    items = [Entry(ObjectRef("bkt", "first")), Prefix("bkt", "p/", True), Entry(ObjectRef("bkt", "last"))]
    out = list(expand(items, lister))
    assert [e.ref.key for e in out] == ["first", "p/a", "p/b", "last"]
    assert out[1].size == 1 and out[1].pin
    assert calls == [("bkt", "p/")]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=5))
def test_fuzz_parser_parses_or_raises_manifest_error_with_line(lines):
    try:
        items = list(parse(lines, "fuzz.txt"))
    except ManifestError as e:
        assert 1 <= e.line <= len(lines)
        assert str(e).startswith(f"fuzz.txt:{e.line}: ")
    else:
        for item in items:
            assert isinstance(item, (Entry, Prefix))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               min_size=1, max_size=60).filter(lambda k: not k.endswith("/")))
def test_any_key_round_trips_through_percent_encoding(key):
    from urllib.parse import quote

    e = one("s3://bkt/" + quote(key, safe="/"))
    assert e.ref.key == key


def test_catalog_round_trips_dedupes_and_finds():
    from s3cache.catalog import Catalog, format_entry
    from s3cache.manifest import parse_line

    entries = [Entry(ObjectRef("bkt", "a b#%/é.jpg"), 5, sha256="0" * 64, pin=True),
               Entry(ObjectRef("bkt", "x"), None, md5="1" * 32, version="v9"),
               Entry(ObjectRef("bkt", "a b#%/é.jpg"), 7),  # duplicate: the first occurrence wins
               Entry(ObjectRef("other", "x"))]
    for e in entries:
        assert parse_line(format_entry(e)) == e
    c = Catalog.build(entries)
    assert len(c) == 3
    assert [c.entry(i) for i in range(3)] == [entries[0], entries[1], entries[3]]
    assert c.position("s3://bkt/a b#%/é.jpg") == 0 and c.position("s3://other/x") == 2
    assert c.position("s3://bkt/nope") is None and "s3://bkt/x" in c
    assert c.pinned == {0} and c.avg_size == 5


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               min_size=1, max_size=60).filter(lambda k: not k.endswith("/")))
def test_any_key_round_trips_through_the_catalog_line(key):
    from s3cache.catalog import format_entry
    from s3cache.manifest import parse_line

    e = Entry(ObjectRef("bkt", key), 3)
    assert parse_line(format_entry(e)) == e
