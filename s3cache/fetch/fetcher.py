"""Fetch one object from S3 into a verified, fsync'd temp file: the code that streams bytes to disk.
Choosing paths and evicting is not here; nor are the retry policy (``retry.py``), the layout of an
object's parts (``parts.py``), which checks apply (``checks.py``) or HEADs and listings (``s3api.py``).

Per object:

* The first request is a GET of the first part (``Range: bytes=0-PART``). For an object that fits in one
  part this is the only request: there is no HEAD round trip, which is what matters for small objects.
  Its ``Content-Range`` gives the total size and its ETag pins the version.
* Further parts are ranged GETs with ``IfMatch=<etag>`` (or the manifest's VersionId), fetched in
  parallel and written with ``pwrite`` at their offsets (``ranged.py``), so an overwrite in S3
  mid-download yields a 412 (``ObjectChanged``) and never a file mixed from two versions.
* Every GET streams on a slot of the ``Link`` (``link.py``): at most ``workers`` connections stream at
  once. A waited-on object is spread over the free connections and half of prefetch's (parts from its
  size and that count, 1 MiB at least, ``part_size`` at most), taking slots before prefetch does; a
  prefetch object is spread over its share of the connections (``workers`` / objects in flight) in
  parts of ``part_size`` to ``prefetch_part_size``. Prefetch gives up only the slots a reader's parts
  wait for, or all of them while a reader waits on a link measured to be saturated. The first files a
  job opens (``early``) are each laid out over their share of the connections (``parts.Early``), behind
  readers and ahead of other prefetch; a prefetch a reader starts waiting on is re-split (``resplit.py``).
* A prefetch (not a reader's, not an early file) goes through AWS's Common Runtime client instead
  (``crtpath.py``, ``crt.py``, ``transport="crt"``) when its size is known and small (one GET of the
  whole object) or unknown (one GET of its first ``crt_max`` bytes, the rest, if any, in the ranged
  parts above): native code writes the body into the temp file at a fraction of botocore's CPU per
  request; the file is then read back through the same ``Digest`` and ``Verifier``. It holds a link
  slot for the whole request, so both transports share one budget and a reader waits behind at most
  ``crt_max`` bytes per connection.
* Bytes are streamed in 1 MiB chunks to the temp file: memory stays flat whatever the object size.
* The strongest available checksum is checked, with the size, before the file is handed back.

Invariants: a ``Fetched`` names a temp file whose bytes passed the check (or whose method is ``size``);
a failed fetch leaves no temp file; a failed attempt's digest is never joined into the object's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import botocore.exceptions

from s3cache.errors import ConfigError, ObjectChanged
from s3cache.manifest.parse import Entry, Listed

from .checksum import Digest, have_crc64nvme
from .crt import MAX_OBJECT, CrtGets, TooLarge
from .crterrors import Unranged
from .crtpath import CrtPath
from .fetched import Fetched, NeedSpace, preallocate, seal, temp_file
from .hangup import endpoint_ports, hang_up
from .link import Link, Slot
from .parts import FLOOR, Early, Span, first_answer, first_span, part_length, status
from .ranged import Priority, RangedParts
from .resplit import CutBody, read_into
from .retry import Cancelled, RetryPolicy, error_code
from .s3api import Counters, Described, ObjectApi, make_client
from .stream import DiskFull, Streams
from .verifier import Verifier

__all__ = ["Cancelled", "Counters", "Described", "DiskFull", "Fetched", "Fetcher", "NeedSpace", "make_client"]

log = logging.getLogger("s3cache.fetch")


class Fetcher:
    """Downloads objects into verified temp files with a pool of part workers.

    ``transport``: "crt" sends a prefetch of a small object of known size, or of unknown size, through
    the CRT (``crtpath.py``), "botocore" sends every GET through botocore.

    Invariants: at most ``workers`` GETs stream at once, each on a slot of ``link`` held from its request
    until its body is read or closed, or for a CRT GET until it ends (a reader's first, then prefetch); two part pools, so a reader's
    parts never queue behind prefetch threads; ``_fg_idle`` is set exactly when no foreground fetch is in
    flight and ``link.readers`` counts those that are; ``_inflight`` holds one priority per URI being
    fetched.
    """

    def __init__(self, client, *, part_size: int, workers: int, max_attempts: int,
                 cancel: threading.Event, new_temp: Callable[[str], tuple[int, str]],
                 discard: Callable[[str], None], prefetch_part_size: int | None = None,
                 require_checksum: bool = False, transport: str = "crt") -> None:
        if not have_crc64nvme():
            # S3 checksums new uploads with CRC64NVME by default; without awscrt such objects could only
            # be checked by their size. awscrt is a core dependency: its absence is a broken install.
            raise ConfigError("awscrt is not installed, so CRC64NVME checksums (S3's default) cannot be "
                              "checked: pip install 'awscrt>=0.20'")
        self.client = client
        # A reader waiting on one object wants it split across many connections; prefetch already has
        # many objects in flight, so more parts would add requests (a round trip, and server work,
        # each) without adding bandwidth: it splits only objects larger than prefetch_part_size.
        self.part_size = part_size
        self.prefetch_part_size = prefetch_part_size or part_size
        self.max_attempts = max_attempts
        self.cancel = cancel
        self._new_temp = new_temp
        self._discard = discard
        self.counters = Counters()
        self.policy = RetryPolicy(max_attempts, cancel, self.counters)
        self.api = ObjectApi(client, self.policy, self.counters)
        self.verifier = Verifier(self.api, require_checksum)
        self._fg_active = 0
        self._fg_lock = threading.Lock()
        self._fg_idle = threading.Event()  # set while no reader is waiting on a fetch
        self._fg_idle.set()
        self.link = Link(workers, cancel)
        self._ports = endpoint_ports(client)
        self._inflight: dict[str, Priority] = {}
        self.streams = Streams(cancel, self.link, self.counters)
        self.parts = RangedParts(self.api, self.policy, self.verifier, self.link, self.streams, self.counters,
                                 self._part_length, workers)
        if transport not in ("crt", "botocore"):
            raise ConfigError(f"unknown transport {transport!r}: crt or botocore")
        # Small prefetch objects go through the CRT (see the module doc); None: botocore for all.
        self.crt: CrtGets | None = None
        self.crt_max = min(MAX_OBJECT, self.prefetch_part_size)
        self._crt: CrtPath | None = None
        if transport == "crt":
            cfg = client.meta.config
            self.crt = CrtGets(client, cancel, cfg.connect_timeout, cfg.read_timeout)
            self._crt = CrtPath(self.crt, self.crt_max, self.link, self.counters, self.verifier, self.parts,
                                new_temp, discard)

    def abort(self) -> None:
        """Stopping: wake every read blocked on a response body (see ``Streams.abort``), and every request
        still waiting for its answer (``hangup.py``). Call after setting ``cancel``."""
        self.streams.abort()
        if self.crt is not None:
            self.crt.cancel_all()
        hang_up(self._ports)

    def close(self) -> None:
        """Stop the part pools and let go of the CRT's native client (its threads and descriptors are
        freed by the CRT once its last request ends), so a process that makes many fetchers does not
        keep one event loop per fetcher it is done with."""
        self.parts.close()
        if self.crt is not None:
            self.crt.close()

    def list(self, bucket: str, prefix: str) -> list[Listed]:
        """Every object under a prefix, in key order (ListObjectsV2, paginated)."""
        return self.api.list(bucket, prefix)

    def describe(self, entry: Entry, checks: bool = True) -> Described:
        """HEAD the object (with its additional checksums). Raises FetchFailed if it is gone.
        ``checks=False``: its size and ETag only, with no part HEADs (``ObjectApi.describe``)."""
        return self.api.describe(entry, checks)

    def _stream(self, body, fd: int, offset: int, expect_len: int, digest: Digest | None,
                prio: Priority | None = None) -> None:
        self.streams.copy(body, fd, offset, expect_len, digest, waited=prio)

    # -- one object --------------------------------------------------------------------------------

    def fetch(self, entry: Entry, admit: Callable[[int], bool], foreground: bool = False,
              early: Early | int | None = None) -> Fetched:
        """Download ``entry`` into a verified, fsync'd temp file. ``admit(size)`` reserves cache space.

        ``foreground``: a reader waits on it; background fetches yield to it while it runs. ``early``: a
        prefetch of one of the first files a job opens (``parts.Early``): laid out over its share of the
        connections (an int, or no share: as a reader's object is, a small first part, then the rest
        over the free connections), ahead of other prefetch and of later early files, behind readers;
        its ``asked`` is called once each of its GETs has been answered.
        Raises NeedSpace when ``admit`` refuses, FetchFailed for permanent S3 errors or exhausted retries,
        ObjectChanged if the object kept changing, ChecksumMismatch if it never verified (WrongChecksum
        at once when the bytes are good and the claim is wrong), NoChecksum when ``require_checksum`` and
        nothing but the size can vouch for it, Cancelled.
        """
        uri = entry.uri
        changed = 0
        seen: dict = {}  # wrong digests of earlier attempts, and how many attempts gave each
        prio = Priority(foreground, early)
        with self._fg_lock:
            self._inflight[uri] = prio
            if foreground:
                self._fg_active += 1
                self.link.readers = self._fg_active
                self._fg_idle.clear()
        try:
            while True:
                try:
                    fetched = self.policy.run(uri, lambda: self._attempt(entry, admit, prio, seen))
                    if entry.size is None and self._crt is not None:
                        self._crt.learn(entry, fetched.size)
                    return fetched
                except ObjectChanged:
                    changed += 1
                    if changed >= 3:
                        raise
                    log.info("%s changed in S3 during the download; starting over", uri)
        finally:
            with self._fg_lock:
                if self._inflight.get(uri) is prio:
                    del self._inflight[uri]
                if foreground or prio.promoted:
                    self._fg_active -= 1
                    self.link.readers = self._fg_active
                    if not self._fg_active:
                        self._fg_idle.set()

    def promote(self, uri: str) -> bool:
        """A reader now waits on a fetch that started as prefetch: it stops yielding to other waited-on
        fetches, and a whole object still streaming on one connection is re-split (``_stream_whole``):
        its rest comes in parts over the free connections, which other prefetch yields to. False if no
        such fetch is in flight.

        It does not make other prefetch pause outright, as a fresh demand's waiting parts do: a reader
        that caught up with prefetch wants those other files next. Pausing them on every promotion cut a
        cold epoch's throughput by a quarter in bench/compare.py."""
        with self._fg_lock:
            prio = self._inflight.get(uri)
            if prio is None or prio.foreground:
                return False
            prio.foreground = True
            self._fg_active += 1
            self.link.readers = self._fg_active
            self._fg_idle.clear()
            prio.promoted = True
        self.link.wake()  # its streams waiting for prefetch's turn now wait only for a free slot
        return True

    def _first_length(self, entry: Entry, prio: Priority) -> int:
        """What the first GET asks for. A reader's object (or an early file spread over more than one
        connection) starts with a small range when its size is unknown (its Content-Range tells the
        size, and the rest is spread over the connections), else with its share of the layout;
        prefetch asks for ``prefetch_part_size`` unless its size is known."""
        if entry.size:
            return self._part_length(entry.size, prio, holding=False)
        return min(FLOOR, self.part_size) if prio.spread and prio.share != 1 else self.prefetch_part_size

    def _part_length(self, nbytes: int, prio: Priority, holding: bool = True) -> int:
        """Parts to spread ``nbytes`` over the connections this fetch may use: a reader's object over the
        free ones and half of prefetch's (``Link.foreground_share``); an early file with a share over
        that many (its job's first files together fill the link, one GET each when they are as many
        as the connections); a prefetch over its share (connections / objects in flight), never in
        parts below ``part_size``."""
        if prio.early and prio.share and not prio.foreground:
            return part_length(nbytes, prio.share, min(FLOOR, self.part_size),
                               max(self.part_size, self.prefetch_part_size))
        if prio.spread:
            share = self.link.foreground_share(holding)
            return part_length(nbytes, share, min(FLOOR, self.part_size), self.part_size)
        with self._fg_lock:
            objects = max(1, len(self._inflight))
        share = max(1, self.link.capacity // objects)
        low = min(self.part_size, self.prefetch_part_size)
        return part_length(nbytes, share, low, self.prefetch_part_size)

    def _attempt(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict) -> Fetched:
        """One attempt. One that failed has asked for its bytes, if only to be refused: an early file's
        hold on other prefetch ends (``Early.asked``), or a throttled first file would keep every other
        object from the link until S3 let it through."""
        try:
            return self._fetch_any(entry, admit, prio, seen)
        except BaseException:
            prio.all_asked()
            raise

    def _fetch_any(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict) -> Fetched:
        """One attempt, through the CRT when ``crtpath`` wants it, else botocore's."""
        if self._crt is not None and self._crt.wants(entry, prio):
            if entry.size is None:
                try:
                    return self._crt.fetch_unsized(entry, admit, prio, seen)
                except Unranged as e:  # a 200 to a ranged GET: only botocore's path takes it (first_answer)
                    log.info("%s: a ranged GET was answered without a range (%s): asking through botocore",
                             entry.uri, e)
                except botocore.exceptions.ClientError as e:
                    if error_code(e)[1] != 416:
                        raise
                    return self._fetch_once(entry, admit, prio, seen, ranged=False)  # empty: no byte 0
            else:
                try:
                    return self._crt.fetch_sized(entry, admit, prio, seen)
                except TooLarge as e:
                    log.info("%s is %d bytes in S3, %d when it was listed: fetching it in parts", entry.uri,
                             e.size, entry.size)
        return self._fetch_once(entry, admit, prio, seen)

    def _fetch_once(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict,
                    ranged: bool = True) -> Fetched:
        """One attempt through botocore; ``ranged`` False: the object is known to be empty (a 416 came)."""
        asked: Span | None = first_span(self._first_length(entry, prio)) if ranged else None
        slot = Slot(self.link, prio)
        try:
            resp = None
            if asked is not None:
                try:
                    resp = self.api.get(entry, asked, None)
                except botocore.exceptions.ClientError as e:
                    if error_code(e)[1] != 416:
                        raise
                    asked = None
            if resp is None:
                resp = self.api.get(entry, None, None)  # an empty object has no byte 0 to range over
        except BaseException:
            slot.release()
            raise
        try:
            return self._fetch_first(entry, admit, prio, seen, resp, asked, slot)
        finally:
            slot.release()

    def _fetch_first(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict, resp: dict,
                     asked: Span | None, slot: Slot) -> Fetched:
        uri = entry.uri
        body = resp["Body"]
        etag = resp.get("ETag", "").strip('"')
        version = resp.get("VersionId") or entry.version or ""
        try:
            # A 200 is the whole object (a server that ignores Range); a 206 must be the range asked for.
            total, whole = first_answer(resp, asked)
            # A 200 to a ranged GET may be a cache's answer with only the range: only a HEAD can tell.
            confirm = asked is not None and status(resp) == 200
            if entry.size is not None and total != entry.size:
                if not entry.size_is_hint:
                    self.verifier.size_mismatch(entry, etag, total)
                # A size from a listing is a hint: the object was rewritten since. S3's size is the truth
                # (admit below reserves for it, once a HEAD agrees), and the checks that follow are S3's own.
                log.info("%s is %d bytes in S3, %d when it was listed: fetching S3's", uri, total, entry.size)
                confirm = True
            if not admit(total):
                raise NeedSpace(total)
            if whole:  # its one GET is all there is to ask for
                prio.all_asked()
            checks = self.verifier.settle(entry, resp, etag, whole, total, confirm) if whole else None
        except BaseException:
            body.close()
            raise
        with temp_file(entry, self._new_temp, self._discard) as (fd, tmp):
            preallocate(fd, uri, total)
            if checks is not None:
                digest = Digest(checks.expect, checks.also)
                self._stream_whole(entry, body, fd, total, etag, digest, prio, slot)
            else:
                checks, digest = self.parts.rest(entry, resp, fd, total, etag, prio, asked, slot, confirm)
            return seal(self.verifier, entry, fd, tmp, total, etag, version, checks, digest, seen)

    def _stream_whole(self, entry: Entry, body, fd: int, total: int, etag: str, digest: Digest, prio: Priority,
                      slot: Slot) -> None:
        """Stream a whole-object answer into the file and, in order, into ``digest``. A prefetch that a
        reader starts waiting on (promoted) with at least two parts' worth left stops at its next chunk;
        the rest comes in ranged parts over the free connections, and is fed to ``digest`` from the file
        (``resplit.py``): on one connection a reader waited for the whole object at one connection's rate."""
        def cut(left: int) -> bool:
            return (prio.promoted and left >= 2 * FLOOR
                    and part_length(left, self.link.foreground_share(True), FLOOR, self.part_size) < left)

        cuttable = CutBody(body, total, cut)
        try:
            self._stream(cuttable, fd, 0, total, digest, prio)
        except botocore.exceptions.IncompleteReadError:
            if cuttable.at is None:
                raise
        slot.release()
        if cuttable.at is not None:
            start = cuttable.at
            self.parts.span(entry, fd, Span(start, total - 1), total, None if entry.version else etag, prio)
            self.counters.add(readback=read_into(digest, fd, start, total))
            log.debug("%s: a reader waits on it; its last %d bytes came in parts", entry.uri, total - start)
