"""One object from a peer into a verified, fsync'd temp file, or a ``PeerFailed`` saying why not.

The request: ``GET /v1/object?uri=<s3 uri>&wait=<seconds>``, signed (``signing``). The owner answers
``200`` with the file's bytes; ``404`` when it does not have the object (outside its manifest, or not
fetched within ``wait``).

Nothing the peer says is proof. The bytes are held to the manifest's checksum when the manifest states
one (then no request goes to S3 at all), else to S3's own, from one ``HeadObject`` (the fetcher's
``describe``: the strongest claim S3 and the manifest make, with part sizes for per-part checksums).
The strongest claim is run whatever the owner says it checked: a peer naming a weaker check (a CRC,
which anyone can forge) must not lower the bar. An object nothing but its size could vouch for is never
taken from a peer (``PeerFailed("unverifiable")``): a peer would be trusted for its bytes. Digest, hashing and the checks are the fetcher's own
(``fetch.checks``, ``fetch.checksum``).
"""

from __future__ import annotations

import errno
import http.client
import os
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from s3cache.errors import ChecksumMismatch
from s3cache.fetch.checks import manifest_expectations
from s3cache.fetch.checksum import CHUNK, Digest, Expectation, strongest
from s3cache.fetch.fetcher import Cancelled, DiskFull, Fetched, NeedSpace
from s3cache.fetch.s3api import Described
from s3cache.manifest.parse import Entry

from . import signing

PATH = "/v1/object"


class PeerFailed(Exception):
    """A peer could not give a verified copy. ``why``: refused, timeout, reset, missing, busy,
    bad-status, bad-bytes, short, slow, unverifiable, no-room. ``marks_out``: whether the peer is skipped for a while
    (a peer that merely lacks the object, or that this host cannot check, is not at fault)."""

    def __init__(self, why: str, detail: str = "") -> None:
        self.why = why
        self.detail = detail
        super().__init__(f"{why}: {detail}" if detail else why)

    @property
    def marks_out(self) -> bool:
        return self.why not in ("missing", "unverifiable", "no-room", "busy")


def request_uri(uri: str, wait: float) -> str:
    return f"{PATH}?uri={quote(uri, safe='')}&wait={wait:.1f}"


class PeerClient:
    """Fetches objects from peers. ``describe(entry)``: one HEAD to S3 (the fetcher's), used only when the
    manifest states no checksum. ``timeout``: seconds a peer may take to answer (it may be fetching the
    object from S3 itself) and between two reads of its body."""

    def __init__(self, secret: bytes, *, timeout: float, new_temp: Callable[[str], tuple[int, str]],
                 discard: Callable[[str], None], describe: Callable[[Entry], Described],
                 cancel: threading.Event, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.timeout = timeout
        self._new_temp = new_temp
        self._discard = discard
        self._describe = describe
        self._cancel = cancel
        self._clock = clock
        self._lock = threading.Lock()
        self.s3_heads = 0  # HEADs asked of S3 for a check (manifests without checksums), under _lock

    def _checks(self, entry: Entry) -> tuple[Expectation | None, int | None, str, str]:
        """The check the bytes must pass, the size they must have (None: the check covers it), and the
        ETag and version to record ("" when unknown: S3 was not asked)."""
        mine = manifest_expectations(entry)
        if mine:
            size = entry.size if entry.size is not None and not entry.size_is_hint else None
            return strongest(mine), size, "", entry.version or ""
        with self._lock:
            self.s3_heads += 1
        d = self._describe(entry)
        return d.expect, d.size, d.etag, d.version

    def get(self, host: str, entry: Entry, admit: Callable[[int], bool],
            budget: Callable[[int], float] = lambda size: 0.0) -> Fetched:
        """``entry`` from ``host`` into a verified temp file. Raises PeerFailed, or NeedSpace, DiskFull,
        Cancelled as the fetcher does (never ChecksumMismatch: a peer's bad bytes are the peer's fault).

        ``budget(size)``: seconds the body may take once the answer began (0: no bound but the idle
        timeout); a peer slower than that fails with ``slow``, so a reader never waits on a peer
        much longer than S3 would have taken."""
        name, _, port = host.rpartition(":")
        target = request_uri(entry.uri, self.timeout)
        conn = http.client.HTTPConnection(name.strip("[]"), int(port), timeout=self.timeout + 5)
        try:
            try:
                conn.request("GET", target, headers=signing.sign(self._secret, "GET", target, self._clock()))
                resp = conn.getresponse()
            except ConnectionRefusedError as e:
                raise PeerFailed("refused", str(e)) from None
            except TimeoutError as e:
                raise PeerFailed("timeout", str(e)) from None
            except (OSError, http.client.HTTPException) as e:
                raise PeerFailed("reset", f"{type(e).__name__}: {e}") from None
            if resp.status == 404:
                raise PeerFailed("missing", resp.reason)
            if resp.status == 503:
                raise PeerFailed("busy", resp.reason)
            if resp.status != 200:
                raise PeerFailed("bad-status", f"{resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length is None or not length.isdigit():
                raise PeerFailed("bad-status", "no Content-Length")
            total = int(length)
            expect, size, etag, version = self._checks(entry)
            if expect is None:
                raise PeerFailed("unverifiable", "nothing but the size could check a peer's bytes")
            if size is not None and total != size:
                raise PeerFailed("bad-bytes", f"{total} bytes offered, {size} expected")
            if not admit(total):
                if entry.size == total and not entry.size_is_hint:
                    raise NeedSpace(total)  # the manifest's size, not the peer's word: wait for room
                # A size only the peer states must not fail the object as too large: S3 will say.
                raise PeerFailed("no-room", f"{total} bytes offered")
            seconds = budget(total)
            deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
            # The ETag and version recorded are S3's (from the HEAD) or the manifest's, never the peer's
            # word: with none, revalidation compares sizes only for this file.
            return self._receive(entry, resp, total, expect, etag, version, deadline, conn.sock)
        finally:
            conn.close()

    def _receive(self, entry: Entry, resp, total: int, expect: Expectation, etag: str, version: str,
                 deadline: float, sock) -> Fetched:
        """The body into a temp file, hashed as it lands. Each read returns what arrived (``read1``),
        within the idle timeout and the time left before ``deadline``, so neither a silent nor a
        trickling peer holds the fetch past them."""
        fd, tmp = self._new_temp(entry.ref.key.rsplit("/", 1)[-1])
        ok = False
        try:
            digest = Digest(expect)
            got = 0
            while got < total:
                if self._cancel.is_set():
                    raise Cancelled(entry.uri)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerFailed("slow", f"{got} of {total} bytes in the time S3 would take")
                try:
                    sock.settimeout(max(0.01, min(self.timeout, left)))
                    chunk = resp.read1(min(CHUNK, total - got))
                except TimeoutError as e:
                    if time.monotonic() >= deadline:
                        raise PeerFailed("slow", f"{got} of {total} bytes in the time S3 would take") from None
                    raise PeerFailed("timeout", f"after {got} of {total} bytes: {e}") from None
                except (OSError, http.client.HTTPException) as e:
                    raise PeerFailed("reset", f"after {got} of {total} bytes: {type(e).__name__}: {e}") from None
                if not chunk:
                    raise PeerFailed("short", f"{got} of {total} bytes")
                digest.update(chunk)
                _write_all(fd, memoryview(chunk), entry.uri, total)
                got += len(chunk)
            try:
                method = digest.check(entry.uri, total)
            except ChecksumMismatch as e:
                raise PeerFailed("bad-bytes", str(e)) from None
            os.fdatasync(fd)
            ok = True
            return Fetched(tmp, total, etag, version, method, digest.local_crc32c)
        finally:
            os.close(fd)
            if not ok:
                self._discard(tmp)


def _write_all(fd: int, data: memoryview, uri: str, total: int) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left for {uri} ({total} bytes)", total) from None
            raise
        data = data[n:]
