"""The wire format of the daemon's two unix sockets, and its limits. Shared by ``control`` (the daemon's
side) and ``client`` (the readers' side); no sockets here.

``ctl.sock`` (stream, one JSON object per line, at most ``MAX_LINE`` bytes) carries requests that need
an answer::

    {"op": "want", "uris": [...], "ahead": [...], "reader": "..."}  ->  {"results": [{"uri", "state", ...}]}
    {"op": "status"}                                                ->  {"status": {...}}
    {"op": "hello"}                                                 ->  {"ok": true, "pid": ...}
    {"op": "order", ...} / {"op": "order_list", ...}                ->  {"ok": true} (shapes: order.py)
    {"op": "explain", "uris": [...]}                                ->  {"results": [{"uri", "state", "text"}]}

Every URI on both sockets is an identity (``ObjectRef.uri``: the raw key, refs.py): readers decode
what users write before sending it, and the daemon never decodes again (``refs.from_identity``).

A request the server refuses gets ``{"error": message, "code": CODE}`` where CODE is one of the
``E_*`` names below. After a ``want``, the daemon pushes ``{"event": "ready" | "failed", "uri": ...}`` on
the same connection for every URI it answered ``pending``; such an event may arrive before the answer to
the ``want`` itself (a file can land while the answer is queued), and clients must accept that.

``use.sock`` (stream) carries fire-and-forget usage notes from readers' fast path over one connection per
reader process: NUL-terminated records of at most ``MAX_RECORD`` bytes, ``R<reader id>`` once, then
``h<uri>`` (found on the first look, a cache hit) or ``w<uri>`` (found after waiting). Keys never
contain NUL. A record with another kind byte, or not UTF-8, is counted and skipped; a record over the
limit closes that connection.
"""

from __future__ import annotations

import json

PROTOCOL = 1

MAX_LINE = 1 << 20  # bytes in one ctl.sock line, newline included
MAX_RECORD = 8 << 10  # bytes in one use.sock record (a URI is at most ~1.1 KiB)
MAX_URIS = 1024  # URIs in one want
MAX_AHEAD = 1024  # "ahead" hints in one want
MAX_LIST = 4096  # items in any other list of a request

NOTE_KINDS = frozenset("Rhw")

# Error codes in {"error": ..., "code": ...} replies.
E_BAD_REQUEST = "BadRequest"  # not JSON, not an object, not UTF-8, too deep
E_TOO_LARGE = "TooLarge"  # a line over MAX_LINE (the connection is then closed)
E_TOO_MANY = "TooMany"  # more URIs or hints than a request may carry
E_BUSY = "Busy"  # the server cannot take the request now (no thread to run it)
E_FAILED = "HandlerFailed"  # the daemon raised while answering


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class BadRequest(Exception):
    """A ctl.sock line the server refuses; ``code`` is one of the E_* codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_request(line: bytes) -> dict:
    """One ctl.sock line as a request object, or BadRequest saying why not.

    Bounded work whatever the bytes: the line is at most MAX_LINE long, nesting deeper than the parser's
    recursion limit is refused (RecursionError), lists are counted."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(E_BAD_REQUEST, f"not UTF-8 at byte {e.start}") from None
    try:
        msg = json.loads(text)
    except RecursionError:
        raise BadRequest(E_BAD_REQUEST, "nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints over Python's digit limit
        raise BadRequest(E_BAD_REQUEST, f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise BadRequest(E_BAD_REQUEST, f"not a JSON object but {type(msg).__name__}")
    if not isinstance(msg.get("op"), str):
        raise BadRequest(E_BAD_REQUEST, "no \"op\" string")
    for field, limit in (("uris", MAX_URIS), ("ahead", MAX_AHEAD)):
        v = msg.get(field)
        if v is None:  # absent, or null: the handlers' defaults apply (null reached them as None once)
            msg.pop(field, None)
            continue
        if not isinstance(v, list) or not all(isinstance(u, str) for u in v):
            raise BadRequest(E_BAD_REQUEST, f"{field!r} must be a list of strings")
        if len(v) > limit:
            raise BadRequest(E_TOO_MANY, f"{len(v)} {field} in one request, at most {limit}")
    for field, v in msg.items():
        if isinstance(v, list) and len(v) > MAX_LIST:
            raise BadRequest(E_TOO_MANY, f"{len(v)} items in {field!r}, at most {MAX_LIST}")
    return msg
