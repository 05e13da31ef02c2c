"""The layout of an object into ranged GETs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3cache.fetch.parts import Span, first_span, spans, total_size, upload_parts


@given(total=st.integers(0, 10_000), part_size=st.integers(1, 3_000))
def test_spans_cover_the_object_once_in_order(total, part_size):
    layout = spans(total, part_size)
    pos = 0
    for i, s in enumerate(layout):
        assert s.start == pos and s.length >= 1
        assert s.length == part_size or i == len(layout) - 1
        pos = s.end + 1
    assert pos == total
    if layout:
        assert layout[0] == first_span(part_size) or total < part_size


def test_span_header_and_length():
    assert Span(0, 99).header == "bytes=0-99" and Span(0, 99).length == 100
    assert first_span(4) == Span(0, 3)
    assert spans(10, 4) == [Span(0, 3), Span(4, 7), Span(8, 9)]
    assert spans(0, 4) == []
    with pytest.raises(ValueError):
        spans(10, 0)


def test_total_size_from_a_ranged_or_a_whole_answer():
    assert total_size({"ContentRange": "bytes 0-99/12345", "ContentLength": 100}) == 12345
    assert total_size({"ContentLength": 77}) == 77


def test_upload_parts_trusts_an_even_layout_only():
    assert upload_parts(16, 3, 6, 4) == (6, 6, 4)  # every part as part 1, a shorter last one
    assert upload_parts(12, 1, 12, 12) == (12,)
    assert upload_parts(16, 3, 5, 5) is None  # 5 + ? + 5 = 16: a middle part differs, ask for each
    assert upload_parts(16, 3, 5, 6) is None  # a last part larger than the first is not an even layout
