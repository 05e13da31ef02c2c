"""Reading and rewriting the head of an HTTP message (status line and headers, as raw bytes): how the
fault proxy (faultproxy.py) changes a request or an answer on its way.

Invariant: each function returns a new head and leaves the body's framing alone (a rewritten answer
keeps its Content-Length)."""

from __future__ import annotations

import re


def drop_header(head: bytes, name: bytes) -> bytes:
    """``head`` without the header ``name``, or without every header starting with ``name`` if it ends
    with ``-``."""
    lines = head.split(b"\r\n")
    prefix = name if name.endswith(b"-") else name + b":"
    return b"\r\n".join(ln for ln in lines if not ln.lower().startswith(prefix))


def set_header(head: bytes, name: str, value: str) -> bytes:
    """``head`` with header ``name`` set to ``value`` (any earlier value dropped)."""
    lines = drop_header(head, name.lower().encode()).split(b"\r\n")
    return b"\r\n".join([lines[0], f"{name}: {value}".encode("latin-1")] + lines[1:])


def misstate_range(head: bytes, fault: str) -> bytes:
    """A ``206``'s head rewritten: ``range-as-200`` makes it a ``200`` without ``Content-Range`` (the
    body is still only the range); ``lie-total`` gives a ``Content-Range`` total that ends with the range."""
    value = header_map(head).get("content-range", "")
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value)
    if m is None:
        return head
    head = drop_header(head, b"content-range")
    if fault == "range-as-200":
        status, _, rest = head.partition(b"\r\n")
        return status.split(b" ", 1)[0] + b" 200 OK\r\n" + rest
    return set_header(head, "Content-Range", f"bytes {m.group(1)}-{m.group(2)}/{int(m.group(2)) + 1}")


def shift_range(head: bytes, value: str) -> bytes:
    """``head`` asking for ``bytes=A-B`` moved by one byte: back, or forward when A is 0."""
    first, _, last = value.removeprefix("bytes=").partition("-")
    delta = -1 if int(first) > 0 else 1
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"range:")]
    rng = f"Range: bytes={int(first) + delta}-{int(last) + delta}".encode()
    return b"\r\n".join([lines[0], rng] + lines[1:])


def header_map(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
    return out
