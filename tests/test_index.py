"""The index's rows: what a Record writes is what a reopened index reads back, field for field."""

from __future__ import annotations

from dataclasses import fields

from s3cache.store.index import READY, SCHEMA, Index, Record


def test_a_record_with_every_field_set_survives_a_reopen(tmp_path):
    rec = Record(READY, "b/k/x.bin", 262144, etag="e-1", version="v9", method="sha256", crc32c="AAAAAA==",
                 fetched_at=1.5, last_used=2.5, claims="sha256=abc", superseded=True)
    row = rec.to_row()
    assert row == {**{f.name: getattr(rec, f.name) for f in fields(Record)}, "v": SCHEMA}
    row["path"] = "changed"  # the row is a copy: writing it never changes the frozen record
    assert rec.path == "b/k/x.bin"
    index = Index(str(tmp_path / "index"))
    index.put_many([("s3://b/k/x.bin", rec)])
    index.close()
    index = Index(str(tmp_path / "index"))
    try:
        assert index.get("s3://b/k/x.bin") == rec
        assert list(index.items()) == [("s3://b/k/x.bin", rec)]
    finally:
        index.close()


def test_a_row_with_fields_this_version_does_not_know_still_loads(tmp_path):
    rec = Record(READY, "b/y", 3)
    assert Record.from_row({**rec.to_row(), "from_a_later_schema": 1}) == rec


def test_settle_writes_ready_only_over_its_own_file_s_row(tmp_path):
    """A deferred ``ready`` row never brings back a row eviction deleted, nor drops a superseded mark or
    a use written on the ``publishing`` row meanwhile; the intents in the same transaction land."""
    from dataclasses import replace

    from s3cache.store.index import PUBLISHING

    index = Index(str(tmp_path / "index"))
    try:
        intent = {n: Record(PUBLISHING, f"b/{n}", 1, fetched_at=5.0) for n in "abcd"}
        index.put_many((f"s3://b/{n}", r) for n, r in intent.items())
        index.delete_many(["s3://b/a"])  # evicted after the look at what to write
        index.mark_superseded("s3://b/b", intent["b"])
        index.touch_many([("s3://b/c", replace(intent["c"], last_used=9.0))])
        index.put_many([("s3://b/d", Record(PUBLISHING, "b/d", 1, fetched_at=6.0))])  # another fetch's file
        new = Record(PUBLISHING, "b/e", 1, fetched_at=7.0)
        assert index.settle_many([(f"s3://b/{n}", replace(r, state=READY)) for n, r in intent.items()],
                                 [("s3://b/e", new)]) == 2
        assert index.get("s3://b/a") is None
        assert index.get("s3://b/b") == replace(intent["b"], state=READY, superseded=True)
        assert index.get("s3://b/c") == replace(intent["c"], state=READY, last_used=9.0)
        assert index.get("s3://b/d") == Record(PUBLISHING, "b/d", 1, fetched_at=6.0)
        assert index.get("s3://b/e") == new
    finally:
        index.close()
