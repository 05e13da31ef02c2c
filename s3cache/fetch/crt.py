"""GETs through AWS's Common Runtime S3 client (``awscrt.s3.S3Client``): a small object's body, or the
first bytes of one whose size is unknown (a ranged GET), written by native code into a temp file the
fetcher made, at a fraction of botocore's CPU per request (bench/cpu.py). One job: send the GET, wait
for it, and answer with the response's headers in botocore's shape, or fail the way a botocore GET
would.

What the fetcher keeps for itself (``crtpath.py``): which objects come this way (prefetch of a small
object of known size, or of one of unknown size), the link slot each request holds, the checks (the file's bytes go through our ``Digest`` and
``Verifier``, never the CRT's validation: with moto it validates nothing, as it asks for checksums in a
spelling moto ignores) and the temp file's fate.

Invariants:

* The CRT never retries (``S3RetryMode.NONE``): a failure is raised as the exception botocore would
  raise for it (``crterrors.py``: a ``ClientError`` carrying S3's code and status,
  ``EndpointConnectionError`` when no answer came, ``CrtFailed`` for a transfer that broke), so
  ``retry.classify`` judges both transports by one rule and the one throttle holds.
* It writes only to the path it is given (the fetcher's temp file); whatever it leaves there on failure
  is the fetcher's to discard.
* One native client per process: it is made on first use and made again in a child after ``fork()``
  (the parent's event-loop threads do not exist there). The parent's client is never touched or freed
  in the child: its destructor would wait for those threads.
* Credentials are botocore's (the client's credential chain, refreshed by it), read per signing; they
  never appear in a log line or an error.
* ``cancel_all`` (stopping) cancels every request in flight; each then fails as ``Cancelled``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import botocore
import botocore.credentials
import botocore.exceptions

from .crterrors import failure
from .retry import Cancelled

log = logging.getLogger("s3cache.fetch")

# The least memory_limit awscrt accepts (0.38 refuses less); its buffers are reserved per part, and a
# part here is one small object, so the limit only caps how many are buffered at once.
MEMORY_LIMIT = 256 << 20
# Largest object sent this way. A CRT GET is never cut for a reader, so a reader's object waits for at
# most one such request's slot. The CRT buffers the body before writing it and the fetcher reads the
# file back to hash it: a copy per byte that botocore's stream does not make. Measured in a fetcher
# (16 at once, CPU per object, CRT against botocore): 256 KiB 1.6 against 2.3-2.9 ms, 1 MiB 2.3-2.8
# against 3.3-3.8, 2 MiB 4.0-5.0 against 4.6-4.9, 4 MiB 7.5-8.9 against 7.3-7.5: the request path's
# saving is gone past 2 MiB. Memory: at most workers x this buffered (16 GETs of 4 MiB raised the
# peak RSS by ~65 MB, of 256 KiB by ~5 MB).
MAX_OBJECT = 2 << 20
_FLOOR_RATE = 1 << 20  # bytes/s below which a request is given up as stalled (beside the timeouts)

# Response headers the verifier reads, in botocore's field names.
_FIELDS = {
    "etag": "ETag",
    "x-amz-version-id": "VersionId",
    "x-amz-checksum-type": "ChecksumType",
    "x-amz-server-side-encryption": "ServerSideEncryption",
    "x-amz-server-side-encryption-customer-algorithm": "SSECustomerAlgorithm",
}
_CHECKSUM = re.compile(r"x-amz-checksum-([a-z0-9]+)")
_CONTENT_RANGE = re.compile(r"bytes \d+-\d+/(\d+)")

_orphans: list = []  # a parent's clients, in a forked child: kept alive, never freed (see the invariants)
_instances: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock a parent's thread held at fork() stays held in the child for ever: each CrtGets gets a
    fresh one (its client is made again on first use, ``CrtGets._client``)."""
    for gets in list(_instances):
        gets._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _botocore_fields(headers: list[tuple[str, str]]) -> dict:
    """A response's headers as botocore's GetObject output names them (the ones the checks read)."""
    out: dict = {}
    for name, value in headers:
        low = name.lower()
        if low in _FIELDS:
            out[_FIELDS[low]] = value
        elif low == "content-length":
            out["ContentLength"] = int(value)
        elif low == "content-range":
            out["ContentRange"] = value
        else:
            m = _CHECKSUM.fullmatch(low)
            if m and m.group(1) not in ("type", "mode"):
                out["Checksum" + m.group(1).upper()] = value
    return out


def _total(headers: list[tuple[str, str]]) -> int | None:
    """The object's total from a ranged answer's Content-Range (None without one)."""
    for name, value in headers:
        if name.lower() == "content-range":
            m = _CONTENT_RANGE.fullmatch(value)
            return int(m.group(1)) if m else None
    return None


class TooLarge(Exception):
    """The object is larger than the request was made for (its listed size was out of date): the GET
    was cancelled, and the object is the botocore path's, which splits it into parts."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


class NoRoom(Exception):
    """``admit`` refused the object's total: the request was cancelled before a byte was written."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no room for {size} bytes")
        self.size = size


class _Pending:
    """One request in flight: its native handle and what its callbacks left. ``wake`` is set when the
    waiting thread has something to do: the request ended, its headers said it is too large, or they
    gave the total to admit (``asks``; the CRT's thread then waits for ``admitted``)."""

    __slots__ = ("admitted", "asks", "done", "headers", "outcome", "request", "status", "too_large", "wake")

    def __init__(self) -> None:
        self.request = None
        self.done = threading.Event()
        self.wake = threading.Event()
        self.admitted = threading.Event()
        self.asks = 0
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.outcome: dict = {}
        self.too_large = 0


class CrtGets:
    """Whole-object GETs over one lazily made awscrt S3Client, addressed and signed as ``client`` (a
    botocore S3 client) would: its endpoint, region, addressing style and credentials.

    ``timeout``: seconds a request may take beyond ``size`` at ``_FLOOR_RATE`` before it is cancelled
    and retried (the CRT's own timeouts cover connecting only)."""

    def __init__(self, client, cancel: threading.Event, connect_timeout: float, timeout: float) -> None:
        self._botocore = client
        self.cancel = cancel
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        url = urlsplit(client.meta.endpoint_url)
        self.tls = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port
        self.region = client.meta.region_name or "us-east-1"
        style = (client.meta.config.s3 or {}).get("addressing_style")
        # AWS's endpoints take the bucket in the host name; an S3-compatible store at an address or a
        # name of its own is asked path-style, as botocore asks it.
        self.virtual = style == "virtual" or (style != "path" and self.host.endswith(".amazonaws.com"))
        # A client configured unsigned (public buckets) sends anonymous requests through the CRT too.
        self.anonymous = client.meta.config.signature_version is botocore.UNSIGNED
        self._lock = threading.Lock()
        self._pid = 0
        self._native = None
        self._closed = False
        self._inflight: set[_Pending] = set()
        self._creds_cache: tuple = (None, None)  # (botocore's frozen credentials, awscrt's copy of them)
        _instances.add(self)

    # -- the native client ---------------------------------------------------------------------------

    def _client(self):
        with self._lock:
            if self._closed:
                raise Cancelled("the CRT client is closed")
            if self._pid != os.getpid():
                if self._native is not None:
                    _orphans.append(self._native)  # a parent's: its threads are gone in this process
                    self._inflight = set()
                self._native = self._make()
                self._pid = os.getpid()
            return self._native

    def close(self) -> None:
        """Let go of the native client (requests still in flight keep it until they end); a later
        ``get`` raises Cancelled. Its event-loop thread and descriptors are freed by the CRT once its
        last request is gone: asynchronously, not before this returns."""
        with self._lock:
            self._closed = True
            if self._native is not None and self._pid != os.getpid():
                _orphans.append(self._native)  # a parent's: never freed here (see the invariants)
            self._native = None

    def _make(self):
        from awscrt.auth import AwsCredentialsProvider
        from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
        from awscrt.s3 import S3Client, S3RequestTlsMode, S3RetryConfig, S3RetryMode

        elg = EventLoopGroup(1)  # one I/O thread: the CRT's CPU per request is small, cores are shared
        bootstrap = ClientBootstrap(elg, DefaultHostResolver(elg))
        creds = None if self.anonymous else self._provider(AwsCredentialsProvider)
        return S3Client(bootstrap=bootstrap, region=self.region, credential_provider=creds,
                        tls_mode=S3RequestTlsMode.ENABLED if self.tls else S3RequestTlsMode.DISABLED,
                        part_size=MAX_OBJECT, memory_limit=MEMORY_LIMIT,
                        retry_config=S3RetryConfig(retry_mode=S3RetryMode.NONE),
                        connect_timeout_ms=max(1, int(self.connect_timeout * 1000)))

    def _provider(self, provider_class):
        """botocore's credentials as the CRT's provider: fixed ones (keys from the environment or a
        file) as they are, others through a delegate that asks botocore at each signing, so they are
        refreshed by botocore's chain (an instance role, SSO, an assumed role)."""
        creds = self._botocore._request_signer._credentials
        if type(creds) is botocore.credentials.Credentials:
            frozen = creds.get_frozen_credentials()
            return provider_class.new_static(frozen.access_key, frozen.secret_key, frozen.token)
        return provider_class.new_delegate(self._credentials)

    def _frozen(self):
        creds = self._botocore._request_signer._credentials
        return creds.get_frozen_credentials() if creds is not None else None

    def _credentials(self):
        """The CRT's signer asks here: botocore's current credentials (refreshed by botocore)."""
        from awscrt.auth import AwsCredentials

        frozen = self._frozen()
        if frozen is None:
            raise RuntimeError("no AWS credentials")
        seen, made = self._creds_cache
        if seen != frozen:
            made = AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)
            self._creds_cache = (frozen, made)
        return made

    # -- requests ------------------------------------------------------------------------------------

    def _target(self, bucket: str, key: str) -> tuple[str, str]:
        """(Host header, request path) for an object, addressed as botocore addresses it."""
        host = self.host if self.port is None else f"{self.host}:{self.port}"
        path = quote(key, safe="/~")
        if self.virtual:
            return f"{bucket}.{host}", f"/{path}"
        return host, f"/{bucket}/{path}"

    def get(self, bucket: str, key: str, version: str | None, path: str, size: int, limit: int,
            ranged: bool = False, admit: Callable[[int], bool] | None = None) -> dict:
        """GET the whole object into ``path`` (created or truncated); its headers as botocore's
        GetObject output names them, with ``ResponseMetadata.HTTPStatusCode``. ``size``: the bytes
        expected, for the time allowed; an object over ``limit`` bytes is not fetched (TooLarge).

        ``ranged``: the object's size is unknown; ask for its first ``size`` bytes only
        (``Range: bytes=0-(size-1)``), in one request (aws-c-s3 sends a ranged GET that fits its part
        size as it is): the answer is a ``206`` whose ``ContentRange`` and ``ContentLength`` say which
        bytes came and the object's total, as a botocore ranged GET's would. A server that did not
        answer with a range raises Unranged. ``admit(total)`` (with ``ranged``) is asked, on the
        calling thread, once the answer's headers give the object's total and before the CRT writes a
        byte of it (the CRT holds its body until then); refused, the request is cancelled (NoRoom).

        Raises ClientError / EndpointConnectionError / CrtFailed / DiskFull as the botocore path would
        (``crterrors``), NoCredentialsError, or Cancelled when stopping."""
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        if not self.anonymous and self._frozen() is None:
            raise botocore.exceptions.NoCredentialsError()
        client = self._client()
        host, target = self._target(bucket, key)
        if version:
            target += "?versionId=" + quote(version, safe="")
        # Asked for in the spelling S3 and moto both honour; the CRT's own validation sends it in one
        # moto ignores, and our Digest checks the bytes anyway.
        headers = HttpHeaders([("Host", host), ("x-amz-checksum-mode", "ENABLED")])
        if ranged:
            headers.add("Range", f"bytes=0-{size - 1}")
        p = _Pending()

        def on_headers(status_code: int, headers: list, **_) -> None:
            p.status, p.headers = status_code, headers
            total = _total(headers) if admit is not None else None
            if total is not None:
                # The body is written to the file once this returns: wait for the caller's admission
                # (stopping, or the caller leaving, releases it too).
                p.asks = total
                p.wake.set()
                while not p.admitted.wait(0.25) and not self.cancel.is_set():
                    pass
            elif status_code == 200:
                n = _botocore_fields(headers).get("ContentLength", 0)
                if n > limit:  # the waiting thread cancels it: not from inside the CRT's callback
                    p.too_large = n
                    p.wake.set()

        def on_done(**kw) -> None:
            p.outcome = kw
            p.done.set()
            p.wake.set()

        with self._lock:
            if self.cancel.is_set():
                raise Cancelled("stopping")
            p.request = client.make_request(type=S3RequestType.GET_OBJECT,
                                            request=HttpRequest("GET", target, headers),
                                            recv_filepath=path,
                                            part_size=max(1 << 20, size if ranged else min(size, MAX_OBJECT)),
                                            on_headers=on_headers, on_done=on_done)
            self._inflight.add(p)
        try:
            self._wait(p, size, admit)
        finally:
            p.admitted.set()  # never leave the CRT's thread waiting in on_headers
            with self._lock:
                self._inflight.discard(p)
                # The native request holds our callbacks, which hold ``p``, until it is destroyed, and it
                # is destroyed only once its Python handle is gone: dropping the handle is what frees it
                # (and, with the last request, lets the client and its event loop shut down). Kept, it
                # is a cycle through native code that no garbage collection can break.
                p.request = None
        return self._answer(p, bucket, key, size, ranged)

    def _wait(self, p: _Pending, size: int, admit: Callable[[int], bool] | None) -> None:
        deadline = time.monotonic() + self.timeout + size / _FLOOR_RATE
        while not p.wake.wait(0.25) or not p.done.is_set():
            if p.asks:
                total, p.asks = p.asks, 0
                p.wake.clear()  # on_done cannot come before ``admitted``: on_headers waits for it
                self._admit(p, admit, total)
                continue
            late = time.monotonic() > deadline
            if self.cancel.is_set() or late or p.too_large:
                p.admitted.set()
                p.request.cancel()
                p.done.wait()  # on_done follows a cancel; the file is no longer written after it
                if self.cancel.is_set():
                    break
                if p.too_large:
                    raise TooLarge(p.too_large)
                raise botocore.exceptions.ReadTimeoutError(endpoint_url=self.host)

    @staticmethod
    def _admit(p: _Pending, admit: Callable[[int], bool], total: int) -> None:
        """Ask ``admit`` for the total the headers gave, then let the CRT go on, or cancel it (NoRoom)."""
        ok = False
        try:
            ok = admit(total)
        finally:
            if not ok:
                p.request.cancel()
            p.admitted.set()
            if not ok:
                p.done.wait()  # on_done follows a cancel; the file is no longer written after it
        if not ok:
            raise NoRoom(total)

    def _answer(self, p: _Pending, bucket: str, key: str, size: int, ranged: bool) -> dict:
        out = p.outcome
        if out.get("error") is None:
            resp = _botocore_fields(p.headers)
            resp["ResponseMetadata"] = {"HTTPStatusCode": out.get("status_code") or p.status}
            return resp
        if self.cancel.is_set():
            raise Cancelled("stopping")
        raise failure(out, endpoint=self.host, uri=f"s3://{bucket}/{key}", size=size, ranged=ranged)

    def cancel_all(self) -> None:
        """Stopping: cancel every request in flight (each then raises Cancelled, as ``cancel`` is set)."""
        with self._lock:
            pending = list(self._inflight) if self._pid == os.getpid() else []
        for p in pending:
            request = p.request  # None once its GET has returned
            if request is not None:
                request.cancel()
