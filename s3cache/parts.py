"""The layout of one object's bytes into ranged GETs, and S3's conventions for ranged answers.

A download is cut into spans of ``part_size`` bytes: the first (``bytes=0-PART``) is asked for before the
size is known, and its ``Content-Range`` tells the total; the rest follow from the total. Pure
arithmetic, no I/O.

Invariants:

* ``spans(total, part_size)`` covers ``[0, total)`` exactly once, in order, with no gap or overlap; every
  span is ``part_size`` bytes but the last, which is 1 to ``part_size`` bytes.
* A ``Span``'s ``end`` is inclusive, as in HTTP's ``Range`` and ``Content-Range``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class Span(NamedTuple):
    """Bytes ``start`` to ``end`` inclusive of one object."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def header(self) -> str:
        """The ``Range`` header that asks for this span."""
        return f"bytes={self.start}-{self.end}"


def first_span(part_size: int) -> Span:
    """What the first GET asks for, before the object's size is known."""
    return Span(0, part_size - 1)


def spans(total: int, part_size: int) -> list[Span]:
    """The object's spans in order; empty for an empty object."""
    if part_size <= 0:
        raise ValueError(f"part size must be positive, got {part_size}")
    return [Span(s, min(total, s + part_size) - 1) for s in range(0, total, part_size)]


def total_size(resp: dict) -> int:
    """The object's size from a GET answer: ``Content-Range``'s total, or the length of a whole body."""
    m = CONTENT_RANGE.fullmatch(resp.get("ContentRange", "") or "")
    return int(m.group(3)) if m else int(resp["ContentLength"])
