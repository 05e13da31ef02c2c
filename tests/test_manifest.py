import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.errors import ManifestError
from s3cache.manifest.parse import Entry, Listed, Prefix, expand, parse, read
from s3cache.manifest.refs import ObjectRef


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


def test_read_missing_file_has_no_line_number(tmp_path):
    path = str(tmp_path / "nope.txt")
    with pytest.raises(ManifestError, match="cannot read manifest") as ei:
        list(read(path))
    assert ei.value.line is None
    assert str(ei.value) == f"{path}: cannot read manifest: No such file or directory"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_read_not_utf8_names_the_line_that_holds_the_byte(tmp_path, newline):
    p = tmp_path / "m.txt"
    p.write_bytes(newline.join([b"# caf\xc3\xa9", b"s3://bkt/ok", b"s3://bkt/\xff", b"s3://bkt/also-ok", b""]))
    with pytest.raises(ManifestError, match="not UTF-8") as ei:
        list(read(str(p)))
    assert ei.value.line == 3
    assert str(ei.value).startswith(f"{p}:3: not UTF-8 text: byte 10 of the line")


def test_read_not_utf8_deep_in_a_big_file(tmp_path):
    # Past the text decoder's first chunk: its offset alone would not say which line.
    p = tmp_path / "m.txt"
    good = b"".join(b"s3://bkt/k%06d size=1\n" % i for i in range(5000))
    p.write_bytes(good + b"s3://bkt/\xe9t\xe9\n")
    with pytest.raises(ManifestError) as ei:
        list(read(str(p)))
    assert ei.value.line == 5001


def test_read_allows_a_byte_order_mark(tmp_path):
    p = tmp_path / "m.txt"
    p.write_bytes(b"\xef\xbb\xbfs3://bkt/k\n")
    assert [e.ref.key for e in read(str(p))] == ["k"]


@pytest.mark.parametrize("value", ["9" * 400, "9" * 5000, str((5 << 40) + 1), "1" + "0" * 19])
def test_huge_sizes_are_a_manifest_error_on_their_line(tmp_path, value):
    from s3cache.manifest.catalog import Catalog

    p = tmp_path / "m.txt"
    p.write_text(f"s3://bkt/a size=1\ns3://bkt/b size={value}\n")
    with pytest.raises(ManifestError) as ei:
        Catalog.build(expand(read(str(p)), lister=lambda b, pfx: []))
    assert ei.value.line == 2 and "more than S3's largest object" in str(ei.value)
    assert len(str(ei.value)) < 200  # the 400 digits are not echoed back


def test_largest_object_size_is_accepted():
    assert one(f"s3://bkt/k size={5 << 40}").size == 5 << 40
    assert one("s3://bkt/k size=000").size == 0


@pytest.mark.parametrize("value", ["²", "٣", "+1", "1_000", "0x10"])
def test_size_takes_ascii_digits_only(value):
    with pytest.raises(ManifestError, match="size= must be a whole number"):
        one(f"s3://bkt/k size={value}")


def test_serve_with_a_400_digit_size_exits_2_naming_file_and_line(tmp_path):
    import subprocess
    import sys

    m = tmp_path / "m.txt"
    m.write_text("s3://bkt/a\ns3://bkt/b size=" + "9" * 400 + "\n")
    r = subprocess.run([sys.executable, "-m", "s3cache", "serve", "--cache-dir", str(tmp_path / "c"), "--manifest",
                        str(m), "--endpoint-url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{m}:2: size= is a number of 400 digits" in r.stderr
    assert "Traceback" not in r.stderr


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
    from s3cache.manifest.catalog import Catalog, format_entry
    from s3cache.manifest.parse import parse_line

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
    from s3cache.manifest.catalog import format_entry
    from s3cache.manifest.parse import parse_line

    e = Entry(ObjectRef("bkt", key), 3)
    assert parse_line(format_entry(e)) == e


def test_listed_sizes_are_hints_manifest_sizes_are_expectations():
    items = [Entry(ObjectRef("bkt", "given"), 5), Prefix("bkt", "p/")]
    given, listed = expand(items, lambda b, p: [Listed("p/a", 7, "e")])
    assert given.size == 5 and not given.size_is_hint
    assert listed.size == 7 and listed.size_is_hint


def test_hostile_listed_keys_are_skipped_reported_and_logged_once(caplog):
    from s3cache.manifest.parse import SkipLog

    bad = {"p/" + "x" * 1100: "1102 bytes, S3 allows at most 1024", "p/nul\x00key": "NUL byte",
           "p/\udcff": "not valid Unicode", "elsewhere/k": "outside that prefix"}
    listing = [Listed("p/a", 1, "e"), *(Listed(k, 1, "e") for k in bad), Listed("p/neg", -1, "e"),
               Listed("p/huge", 6 << 40, "e"), Listed("p/b", 2, "e")]
    skipped = SkipLog()
    with caplog.at_level("WARNING", logger="s3cache.manifest"):
        out = list(expand([Prefix("bkt", "p/")], lambda b, p: listing, skipped))
    assert [e.ref.key for e in out] == ["p/a", "p/b"]
    assert skipped.count == 6 and len(skipped.items) == 6
    reasons = dict(skipped.items)
    for key, why in bad.items():
        uri = next(u for u in reasons if u.startswith("s3://bkt/" + repr(key)[1:-1][:10]))
        assert why in reasons[uri]
        assert "\x00" not in uri and "\n" not in uri and len(uri) < 300
    assert "between 0 and" in reasons["s3://bkt/p/neg"]
    assert len([r for r in caplog.records if "skipping listed object" in r.getMessage()]) == 6


def test_a_flood_of_bad_keys_costs_a_counter_not_a_list(caplog):
    from s3cache.manifest.parse import SkipLog

    skipped = SkipLog(keep=5, log_first=3)
    with caplog.at_level("WARNING", logger="s3cache.manifest"):
        out = list(expand([Prefix("bkt", "p/")], lambda b, p: (Listed(f"p/{i}\x00", 1, "") for i in range(10_000)),
                          skipped))
    assert out == [] and skipped.count == 10_000 and len(skipped.items) == 5
    assert len(caplog.records) == 4 and "10000" in caplog.records[-1].getMessage()


def test_hostile_keys_from_a_real_listing_are_skipped(moto, s3, bucket, tmp_path):
    """moto lists keys AWS would refuse (1,100 bytes, a NUL): expand leaves them out (issue 18.12)."""
    import threading

    from s3cache.fetch.fetcher import Fetcher, make_client
    from s3cache.manifest.parse import SkipLog

    for k in ["p/ok", "p/" + "x" * 1100, "p/nul\x00key", "p/zz"]:
        s3.put_object(Bucket=bucket, Key=k, Body=b"abc")
    f = Fetcher(make_client(moto.url, "us-east-1", 4, 5, 10), part_size=1 << 20, workers=1, max_attempts=2,
                cancel=threading.Event(), new_temp=lambda: None, discard=lambda p: None)
    try:
        skipped = SkipLog()
        out = list(expand([Prefix(bucket, "p/")], f.list, skipped))
    finally:
        f.close()
    assert [e.ref.key for e in out] == ["p/ok", "p/zz"] and all(e.size_is_hint for e in out)
    assert skipped.count == 2
