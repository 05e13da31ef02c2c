"""What a failed CRT GET means (``crt.py``'s requests), said the way a botocore GET would have said it,
so that ``retry.classify`` judges both transports by one rule and the one throttle holds.

Contract of ``failure(outcome, ...)``, for the ``on_done`` outcome of a request that failed and was not
cancelled by a stop (the caller raises ``Cancelled`` for those, before asking here):

* S3 answered with an error: ``ClientError`` carrying the code and message of S3's XML body (the status
  as the code when the body has none) and the HTTP status;
* the CRT swallowed an answer and named it instead (SlowDown, InternalError, RequestTimeTooSkewed): the
  ``ClientError`` botocore would have raised for that answer;
* a ranged GET answered without a range (a ``200``): ``Unranged``, for the botocore path to take;
* the disk filled: ``DiskFull``, naming the object and its size;
* no answer came (refused, timed out, no route, DNS): ``EndpointConnectionError`` for the endpoint;
* anything else (a reset connection, a short body): ``CrtFailed``, transient, as botocore's read errors.

It returns the exception, never raises it, and reads only the outcome: S3's code and message, the HTTP
status and the CRT's error name reach the message; credentials and request headers never do.
"""

from __future__ import annotations

from xml.etree import ElementTree

import botocore.exceptions

from .stream import DiskFull

_UNREACHABLE = ("CONNECTION_REFUSED", "SOCKET_TIMEOUT", "DNS", "NO_ROUTE", "CONNECT_TIMEOUT",
                "NETWORK_DOWN", "HOST_UNREACHABLE")

# Errors the CRT names instead of passing the answer on: the S3 code and status botocore would have seen.
_ANSWERS = {"AWS_ERROR_S3_SLOW_DOWN": ("SlowDown", 503), "AWS_ERROR_S3_INTERNAL_ERROR": ("InternalError", 500),
            "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": ("RequestTimeTooSkewed", 403)}

# What the CRT fails a ranged GET with when the answer carried no Content-Range: a 200 that fits its
# buffer, and one that does not.
_UNRANGED = ("AWS_ERROR_S3_MISSING_CONTENT_RANGE_HEADER", "AWS_ERROR_DEST_COPY_TOO_SMALL")


class CrtFailed(botocore.exceptions.BotoCoreError):
    """A CRT request that broke after S3 answered, or for a reason of its own (a reset connection, a
    short body): transient, as botocore's read errors are."""

    fmt = "the CRT's GET failed: {name}"


class Unranged(Exception):
    """A ranged GET was answered without a range (a ``200``: a server or proxy that ignores ``Range``, or
    a cache that passes a range off as the object); the CRT refuses such an answer without handing
    over its headers. The botocore path knows how to take it (``parts.first_answer``)."""


def _error_fields(body: bytes | None) -> tuple[str, str]:
    """S3's error code and message from an error body ("" when it has none or is not S3's XML)."""
    if not body:
        return "", ""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


def _client_error(code: str, message: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject")


def failure(outcome: dict, *, endpoint: str, uri: str, size: int, ranged: bool) -> Exception:
    """The exception for a failed request's ``on_done`` keywords (``outcome["error"]`` is set).
    ``endpoint``: the host named by EndpointConnectionError; ``uri`` and ``size``: the object, named by
    DiskFull; ``ranged``: the request asked for a range (only then is a missing range Unranged)."""
    status = outcome.get("status_code") or 0
    if outcome.get("error_headers") is not None and status:
        code, message = _error_fields(outcome.get("error_body"))
        return _client_error(code or str(status), message, status)
    error = outcome["error"]
    name = getattr(error, "name", type(error).__name__)
    if ranged and name in _UNRANGED:
        return Unranged(name)
    if name == "AWS_ERROR_NO_SPACE":
        return DiskFull(f"no space left for {uri} ({size} bytes)", size)
    if name in _ANSWERS:
        code, status = _ANSWERS[name]
        return _client_error(code, "", status)
    if any(word in name for word in _UNREACHABLE):
        return botocore.exceptions.EndpointConnectionError(endpoint_url=endpoint)
    return CrtFailed(name=name)
