"""An object's bytes in ranged GETs, in parallel: the parts after a first answer that did not hold the
whole object (``rest``), and the remainder of a whole-object stream cut short for a reader (``span``,
see ``resplit.py``). The fetcher (``fetcher.py``) sends the first GET and decides the layout's part
length; this module sends the other parts, each on a slot of the ``Link`` and retried on its own, and
writes them with ``pwrite`` at their offsets.

A part of a prefetch that a reader starts waiting on (promoted) stops at its next chunk when much of it
is left, and its rest comes in smaller parts over the free connections, as a whole-object stream's does
(``resplit.py``): a 64 MiB part on one connection kept a reader waiting for it at one connection's rate.

Invariants: every part is a ranged GET pinned to the first answer's version (``If-Match`` on its ETag,
or the manifest's VersionId) and its answer must be exactly its range (``check_ranged``); when a call
returns or raises, no part of it is running or will run (none may write into the file once the caller
closes it); three pools, so a reader's parts never queue behind prefetch's, nor early prefetch's
behind plain prefetch's; a part's digest is joined into the object's only when it streamed whole.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import botocore.exceptions

from s3cache.manifest.parse import Entry

from .checksum import Digest
from .link import Link, Slot
from .partdigest import InOrderDigest, SplitDigest
from .parts import FLOOR, Early, Span, check_ranged, spans
from .pool import OrderedPool
from .resplit import CutBody, read_into
from .retry import BadResponse, Retry, RetryPolicy, classify
from .s3api import Counters, ObjectApi
from .stream import Streams
from .verifier import Checks, Verifier

log = logging.getLogger("s3cache.fetch")


class Priority:
    """Whether a reader waits on this fetch; a prefetch can be promoted while it runs. ``early``: a
    prefetch of one of the first files a job opens, the job's ``order``-th (see ``Link``), laid out over
    its ``share`` of the connections (``parts.Early``; an int: its order, laid out like a reader's)."""

    __slots__ = ("_asked", "early", "foreground", "order", "promoted", "share")

    def __init__(self, foreground: bool, early: Early | int | None = None) -> None:
        self.foreground = foreground
        self.promoted = False
        self.early = early is not None and not foreground
        if isinstance(early, int):
            early = Early(early)
        self.order = early.order if early is not None else 0
        self.share = early.share if self.early else None
        self._asked = early.asked if early is not None else None

    def all_asked(self) -> None:
        """Every byte of the object has been asked for: tell the one who wanted to know, once."""
        asked, self._asked = self._asked, None
        if asked is not None:
            asked()

    @property
    def spread(self) -> bool:
        """Laid out over the free connections in small parts, as a reader's object is."""
        return self.foreground or self.early


class RangedParts:
    """Sends an object's ranged parts on ``workers`` threads per kind of fetch (reader's, early,
    prefetch). ``length(nbytes, prio)``: the part length to cut ``nbytes`` of a fetch of ``prio`` into (the
    fetcher's)."""

    def __init__(self, api: ObjectApi, policy: RetryPolicy, verifier: Verifier, link: Link, streams: Streams,
                 counters: Counters, length: Callable[[int, Priority], int], workers: int) -> None:
        self.api = api
        self.policy = policy
        self.verifier = verifier
        self.link = link
        self.streams = streams
        self.counters = counters
        self._length = length
        # Three part pools, so that a reader's object never queues behind parts of background prefetch,
        # and early prefetch's parts (which wait for slots ahead of plain prefetch's) not behind them
        # either; early parts start in the job's order of their files (``pool.py``).
        self._parts = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3cache-part")
        self._fg_parts = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3cache-fgpart")
        self._early_parts = OrderedPool(workers, "s3cache-earlypart")

    def close(self) -> None:
        for pool in (self._parts, self._fg_parts, self._early_parts):
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, prio: Priority, fn: Callable, *args) -> Future:
        """Run a part on the pool of its fetch's kind: a reader's, early prefetch's (its file's order
        first), or plain prefetch's."""
        if prio.foreground:
            return self._fg_parts.submit(fn, *args)
        if prio.early:
            return self._early_parts.submit(fn, *args, rank=prio.order)
        return self._parts.submit(fn, *args)

    def _stream(self, body, fd: int, offset: int, expect_len: int, digest: Digest | None, prio: Priority) -> None:
        self.streams.copy(body, fd, offset, expect_len, digest, waited=prio)

    def _stream_cut(self, entry: Entry, body: CutBody, fd: int, span: Span, total: int, pin: str | None,
                    digest, prio: Priority, release: Callable[[], None]) -> None:
        """Stream one part into the file and ``digest``. Cut short for a reader who started waiting on
        the prefetch (``body.at``), its slot is released and the rest of the part comes in ranged parts
        over the free connections (``span``), then is fed to ``digest`` from the file, in order."""
        try:
            self._stream(body, fd, span.start, span.length, digest, prio)
        except botocore.exceptions.IncompleteReadError:
            if body.at is None:
                raise
        if body.at is None:
            return
        release()
        start = span.start + body.at
        self.span(entry, fd, Span(start, span.end), total, pin, prio)
        if digest is not None:
            self.counters.add(readback=read_into(digest, fd, start, span.end + 1))
        log.debug("%s: a reader waits on it; the last %d bytes of a part came in parts", entry.uri,
                  span.end + 1 - start)

    def span(self, entry: Entry, fd: int, span: Span, total: int, pin: str | None, prio: Priority) -> None:
        """Write ``span`` of the object into the file in ranged parts over the connections this fetch may
        use (each retried on its own, pinned by ``pin``), without a digest."""
        uri = entry.uri
        length = self._length(span.length, prio)
        layout = [Span(s, min(span.end, s + length - 1)) for s in range(span.start, span.end + 1, length)]

        def once(part: Span) -> None:
            part_slot = Slot(self.link, prio)
            try:
                resp = self.api.get(entry, part, pin)
                try:
                    check_ranged(resp, part, total)
                except BadResponse:
                    resp["Body"].close()
                    raise
                self._stream(resp["Body"], fd, part.start, part.length, None, prio)
            finally:
                part_slot.release()

        futures = [self._submit(prio, self.policy.run, uri, lambda p=p: once(p)) for p in layout]
        try:
            for f, p in zip(futures, layout):
                # A part cut short calls this on a thread of the pool these parts go to: when every
                # thread of it is such a part, none is left to start them. A part no thread has taken
                # yet runs here instead (the caller waits anyway), so the wait always ends.
                if f.cancel():
                    self.policy.run(uri, lambda p=p: once(p))
                else:
                    f.result()
        finally:
            _settle_all(futures)

    def rest(self, entry: Entry, first: dict, fd: int, total: int, etag: str, prio: Priority,
             asked: Span, slot: Slot | None, confirm: bool = False) -> tuple[Checks, Digest]:
        """Write part 0 from the open first answer and the other parts in parallel, each pinned by
        If-Match and each answer checked to be exactly its range; return the checks and the whole
        object's digest.

        ``first["Body"]`` None (and ``slot`` None): part 0 is in the file already (the CRT wrote it);
        it is fed to the digest from the file, ahead of the other parts, as a part that landed first.

        A ranged GET carries no whole-object checksum, so a HEAD looks for one (and for the part sizes a
        multipart ETag needs) while the other parts' GETs are on their way, not before them: under load
        that round trip was most of the time to a waiting reader's first file. Parts start writing
        once the checks are settled, each feeding its own CRCs when they are CRCs (SplitDigest); a hash
        that needs the bytes in order (MD5, SHA) is fed by the part at the frontier as it streams, and
        reads back only what landed out of order (InOrderDigest), not the whole file.
        """
        uri = entry.uri
        first_body = first["Body"]
        pin = None if entry.version else etag
        settled = threading.Event()
        final: list = [Checks(None), None]  # the checks, and their SplitDigest or InOrderDigest

        def cut(left: int) -> bool:  # a reader now waits on this prefetch: the rest of a long part in parts
            return prio.promoted and left >= CUT_LEFT and self._length(left, prio) < left

        def stream(body, span: Span, release: Callable[[], None]) -> None:
            settled.wait()
            split = final[1]
            body = CutBody(body, span.length, cut)
            if isinstance(split, InOrderDigest):
                attempt = split.attempt(span.start)
                try:
                    self._stream_cut(entry, body, fd, span, total, pin, attempt, prio, release)
                except BaseException:
                    split.failed(attempt)
                    raise
                split.finished(attempt)
                return
            d = split.part() if split is not None else None
            self._stream_cut(entry, body, fd, span, total, pin, d, prio, release)
            if split is not None:
                split.done(span.start, d)

        def get(span: Span):
            resp = self.api.get(entry, span, pin)
            try:
                check_ranged(resp, span, total)
            except BadResponse:
                resp["Body"].close()
                raise
            return resp["Body"]

        started: set[int] = set()  # parts whose GET was answered (a retry's again does not count twice)

        def once(span: Span) -> None:
            part_slot = Slot(self.link, prio)
            try:
                body = get(span)
                if span.start:  # part 0 (retried here) was asked for first
                    started.add(span.start)
                    if len(started) == len(layout) - 1:
                        prio.all_asked()
                stream(body, span, part_slot.release)
            finally:
                part_slot.release()

        def part(span: Span) -> None:
            self.policy.run(uri, lambda: once(span))

        layout = spans(total, self._length(total - asked.length, prio), asked.length)
        futures = [self._submit(prio, part, s) for s in layout[1:]]
        try:
            try:
                final[0] = self.verifier.settle(entry, first, etag, False, total, confirm)
                if SplitDigest.splittable(final[0].expect, final[0].also):
                    final[1] = SplitDigest(final[0].expect, final[0].also)
                else:
                    final[1] = InOrderDigest(Digest(final[0].expect, final[0].also), fd)
            except BaseException:
                if first_body is not None:
                    first_body.close()
                raise
            finally:
                settled.set()  # on failure too: the parts must not wait for ever
            if first_body is None:
                self.counters.add(readback=_landed(final[1], fd, layout[0]))
            else:
                try:
                    stream(first_body, layout[0], slot.release)
                except Exception as e:
                    verdict = classify(e, uri)
                    if not isinstance(verdict, Retry):
                        raise
                    slot.release()
                    part(layout[0])  # retry only the first part, the others are already under way
                slot.release()
            for f in futures:
                f.result()
        finally:
            _settle_all(futures)
        if isinstance(final[1], InOrderDigest):
            self.counters.add(readback=final[1].readback)
            return final[0], final[1].result(total)
        return final[0], final[1].joined()


def _landed(split: SplitDigest | InOrderDigest, fd: int, span: Span) -> int:
    """Feed ``span``, already in the file, to the object's digest as a part that streamed whole; how
    many bytes were read back."""
    if isinstance(split, InOrderDigest):
        attempt = split.attempt(span.start)  # at the frontier (byte 0): hashed as it is read
        read_into(attempt, fd, span.start, span.end + 1)
        split.finished(attempt)
    else:
        d = split.part()
        read_into(d, fd, span.start, span.end + 1)
        split.done(span.start, d)
    return span.length


CUT_LEFT = 4 * FLOOR  # a part with less left ends on its connection: a cut costs a request's round trip


def _settle_all(futures: list[Future]) -> None:
    """Cancel the parts not started and wait for the others to end (their outcome is the caller's)."""
    for f in futures:
        f.cancel()
    for f in futures:  # none may write into the file once the caller closes it
        if not f.cancelled():
            try:
                f.exception()
            except Exception:
                pass
