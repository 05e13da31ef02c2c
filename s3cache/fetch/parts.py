"""The layout of one object's bytes into ranged GETs, and S3's conventions for ranged answers.

A download is cut into spans of ``part_size`` bytes: the first (``bytes=0-PART``) is asked for before the
size is known, and its ``Content-Range`` tells the total; the rest follow from the total. Pure
arithmetic, no I/O.

Invariants:

* ``spans(total, part_size, first)`` covers ``[0, total)`` exactly once, in order, with no gap or
  overlap; the first span is ``first`` bytes (default ``part_size``), every later one ``part_size`` bytes
  but the last, which is 1 to ``part_size`` bytes.
* ``part_length`` spreads bytes over connections in whole MiB (ranged GETs much smaller than 1 MiB cost
  a round trip and server work each for little data; S3's guidance is 8-16 MB per ranged GET, which the
  bounds callers pass keep to when connections are few).
* A ``Span``'s ``end`` is inclusive, as in HTTP's ``Range`` and ``Content-Range``.
* A ranged answer is accepted only as a ``206`` whose ``Content-Range`` is exactly the span asked for
  and whose length is the span's (``check_ranged``); anything else is a ``BadResponse`` (retried). A
  ``200`` to the first request is read as the whole object (``first_answer``): servers that ignore
  ``Range`` answer so, and its body is then all there is to read; the fetcher has a HEAD confirm its
  size, since a broken cache may answer so with only the range.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from .retry import BadResponse

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


def spans(total: int, part_size: int, first: int | None = None) -> list[Span]:
    """The object's spans in order; empty for an empty object. ``first``: the first span's length (the
    range the first GET asked for), when the rest are cut to another size."""
    if part_size <= 0 or (first is not None and first <= 0):
        raise ValueError(f"part sizes must be positive, got {part_size} and {first}")
    if not total:
        return []
    head = min(total, first or part_size)
    return [Span(0, head - 1)] + [Span(s, min(total, s + part_size) - 1) for s in range(head, total, part_size)]


class Early(NamedTuple):
    """One of the first files a job opens, fetched ahead of other prefetch: the job's ``order``-th, laid
    out over ``share`` connections (its part of the link among the job's first files; None: the free
    connections, as a reader's object), and ``asked``, called once every byte of it has been asked for
    (each of its GETs answered), after which other prefetch may take connections."""

    order: int
    share: int | None = None
    asked: Callable[[], None] | None = None


MiB = 1 << 20
FLOOR = MiB  # the smallest part a download is cut into (but a smaller --part-size)


def part_length(nbytes: int, connections: int, low: int, high: int) -> int:
    """The part length that spreads ``nbytes`` over ``connections``: rounded up to whole MiB, at least
    ``low`` and at most ``high`` (``low`` wins if they cross)."""
    want = -(-nbytes // max(1, connections))
    want = -(-want // MiB) * MiB
    return max(low, min(high, want))


def total_size(resp: dict) -> int:
    """The object's size from a GET answer: ``Content-Range``'s total, or the length of a whole body."""
    m = CONTENT_RANGE.fullmatch(resp.get("ContentRange", "") or "")
    return int(m.group(3)) if m else int(resp["ContentLength"])


def status(resp: dict) -> int:
    return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def first_answer(resp: dict, asked: Span | None) -> tuple[int, bool]:
    """``(total size, whole)`` from the answer to the first GET (``asked`` None: the whole object).

    ``whole`` is True when the body is the whole object: a ``200``, or a ``206`` that covers it. A
    ``206`` must start at byte 0 and end where the span or the object ends."""
    if status(resp) != 206:
        return int(resp["ContentLength"]), True
    m = CONTENT_RANGE.fullmatch(resp.get("ContentRange", "") or "")
    if asked is None or not m:
        raise BadResponse(f"a 206 with Content-Range {resp.get('ContentRange')!r} to a GET of {asked}")
    total = int(m.group(3))
    check_ranged(resp, Span(0, min(asked.end, total - 1)), total)
    return total, total <= asked.length


def check_ranged(resp: dict, span: Span, total: int) -> None:
    """Raise BadResponse unless ``resp`` is a 206 for exactly ``span`` of an object of ``total`` bytes."""
    want = f"bytes {span.start}-{span.end}/{total}"
    got = resp.get("ContentRange")
    if status(resp) != 206 or got != want or int(resp.get("ContentLength", -1)) != span.length:
        raise BadResponse(f"asked for {want}, got HTTP {status(resp)} with Content-Range {got!r} and "
                          f"{resp.get('ContentLength')} bytes")


def upload_parts(total: int, count: int, first: int, last: int) -> tuple[int, ...] | None:
    """The part sizes of a multipart upload of ``count`` parts if its first (``first`` bytes) and last
    (``last`` bytes) parts say the layout is even (every part ``first`` bytes but a shorter last one);
    None when the middle parts must be asked for one by one."""
    if count == 1:
        return (first,) if first == total else None
    if 0 < last <= first and (count - 1) * first + last == total:
        return (first,) * (count - 1) + (last,)
    return None
