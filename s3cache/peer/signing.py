"""Requests between peers are signed with a shared secret: an HMAC-SHA256 over the method, the request
URI (path and query, exactly as sent) and the time, in two headers.

A request is accepted only if its signature matches (compared in constant time) and its time is within
``SKEW`` seconds of the receiver's clock, so a captured request cannot be replayed later than that.
The secret comes from a file (a Kubernetes Secret mounted in the DaemonSet); it is never logged.
Pure but for ``read_secret``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

from s3cache.errors import ConfigError

TIME_HEADER = "X-S3cache-Time"
SIGNATURE_HEADER = "X-S3cache-Signature"
SKEW = 60.0  # seconds a signed request stays valid either side of the receiver's clock
MIN_SECRET = 16  # bytes: shorter secrets are refused at start


def read_secret(path: str | os.PathLike) -> bytes:
    """The shared secret in ``path`` (surrounding whitespace removed). Raises ConfigError if the file
    cannot be read, is too short, or is readable by others (a secret anyone on the host can read is no
    secret)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"--peer-secret-file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & stat.S_IROTH:
            raise ConfigError(f"--peer-secret-file {path} is readable by every user: chmod o-r it")
        with os.fdopen(os.dup(fd), "rb") as f:
            secret = f.read(1 << 16).strip()
    finally:
        os.close(fd)
    if len(secret) < MIN_SECRET:
        raise ConfigError(f"--peer-secret-file {path} holds {len(secret)} bytes; at least {MIN_SECRET} are needed")
    return secret


def signature(secret: bytes, method: str, uri: str, when: str) -> str:
    """Hex HMAC-SHA256 of ``method``, ``uri`` and ``when``, one per line."""
    msg = f"{method.upper()}\n{uri}\n{when}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, uri: str, now: float) -> dict[str, str]:
    """The headers that sign a request for ``uri`` at ``now`` (seconds since the epoch)."""
    when = f"{now:.3f}"
    return {TIME_HEADER: when, SIGNATURE_HEADER: signature(secret, method, uri, when)}


def check(secret: bytes, method: str, uri: str, headers, now: float, skew: float = SKEW) -> str | None:
    """Why a request is refused, or None if it is signed right and fresh. ``headers``: a mapping with
    ``get`` (an ``http.client.HTTPMessage`` or a dict)."""
    when = headers.get(TIME_HEADER)
    given = headers.get(SIGNATURE_HEADER)
    if not when or not given:
        return "unsigned"
    try:
        t = float(when)
    except ValueError:
        return "bad time"
    if not abs(now - t) <= skew:  # also refuses NaN
        return "stale"
    if not hmac.compare_digest(signature(secret, method, uri, when), given.strip().lower()):
        return "bad signature"
    return None
