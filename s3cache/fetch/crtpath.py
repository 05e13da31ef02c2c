"""The fetcher's attempts through AWS's Common Runtime client (``crt.py``): which prefetch goes that way,
and how its answer becomes a verified temp file.

* A prefetch (not a reader's object, not one of a job's first files) of known size, 0 < size <=
  ``crt_max``: one GET of the whole object (``fetch_sized``).
* A prefetch of unknown size (a manifest line without ``size=``): one ranged GET of its first
  ``crt_max`` bytes (``fetch_unsized``). Its Content-Range tells the total, which is admitted before
  the CRT writes a byte (it holds the body until ``admit`` answers, ``CrtGets.get``). An object that came whole is
  checked as a sized one; a larger one keeps those bytes and gets its rest in botocore's ranged parts, pinned to this answer's ETag (or the
  manifest's VersionId), the first bytes fed to the object's digest from the file (``RangedParts.rest``).
  A larger object costs this way a GET and a HEAD more than botocore's one GET of
  ``prefetch_part_size`` would: a folder whose last object of unknown size was larger than ``crt_max``
  sends its next ones through botocore (``wants``), as a dataset's objects are mostly alike in size.
  The first answer's ``Content-Range`` teaches it (not the end of the whole fetch), and until a folder
  has taught anything, one of its objects at a time probes it through the CRT while the others go
  through botocore: a first wave of sixteen 16 MiB objects all through the CRT cost four requests each.

Each CRT GET holds a link slot until it ends, so both transports share one budget and a reader waits
behind at most ``crt_max`` bytes per connection. Every byte is checked by our ``Digest`` and
``Verifier``, never by the CRT. Answers only botocore's path can take are raised for it to take them:
``TooLarge`` (a listed size out of date), ``Unranged`` (a ``200`` to the ranged GET) and a ``416`` (an
empty object has no byte 0).

Invariants: as ``fetcher.py``'s (a returned ``Fetched`` names a checked temp file; a failed attempt
leaves none). ``learned`` holds at most ``FOLDERS`` folders; a folder is in ``probing`` only while
one of its objects' ranged CRT GET has not given its first answer (or failed), and not once learned.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from s3cache.manifest.parse import Entry

from .checksum import Digest
from .crt import CrtGets, NoRoom
from .fetched import Fetched, NeedSpace, preallocate, seal, temp_file
from .link import Link, Slot
from .parts import first_answer, first_span
from .ranged import Priority, RangedParts
from .resplit import read_into
from .retry import BadResponse
from .s3api import Counters
from .verifier import Verifier

log = logging.getLogger("s3cache.fetch")

FOLDERS = 4096  # folders remembered; a job reads from a few at a time


class CrtPath:
    """The CRT attempts of one fetcher, over its link, counters, verifier and ranged parts.
    ``new_temp(name) -> (fd, path)`` and ``discard(path)`` are the fetcher's temp files."""

    def __init__(self, crt: CrtGets, crt_max: int, link: Link, counters: Counters, verifier: Verifier,
                 parts: RangedParts, new_temp: Callable[[str], tuple[int, str]],
                 discard: Callable[[str], None]) -> None:
        self.crt = crt
        self.crt_max = crt_max
        self.link = link
        self.counters = counters
        self.verifier = verifier
        self.parts = parts
        self._new_temp = new_temp
        self._discard = discard
        self.learned: dict[str, bool] = {}  # folder -> its last object of unknown size was over crt_max
        self.probing: set[str] = set()  # folders not learned yet whose probe is on its way
        self._lock = threading.Lock()  # learned and probing, between the fetcher's workers

    @staticmethod
    def _folder(entry: Entry) -> str:
        return f"{entry.ref.bucket}/{entry.ref.key.rpartition('/')[0]}"

    def wants(self, entry: Entry, prio: Priority) -> bool:
        """Whether this attempt goes through the CRT (see the module doc). True for an object of unknown
        size in a folder not learned yet makes it the folder's probe: ``fetch_unsized`` must follow."""
        if prio.spread:
            return False
        if entry.size is None:
            folder = self._folder(entry)
            with self._lock:
                large = self.learned.get(folder)
                if large is None:
                    if folder in self.probing:
                        return False  # its size comes with the probe's first answer: botocore meanwhile
                    self.probing.add(folder)
                return not large
        return 0 < entry.size <= self.crt_max

    def learn(self, entry: Entry, size: int) -> None:
        """An object of unknown size turned out ``size`` bytes: remember it for its folder."""
        folder = self._folder(entry)
        with self._lock:
            if len(self.learned) >= FOLDERS:
                self.learned.clear()
            self.learned[folder] = size > self.crt_max
            self.probing.discard(folder)

    def _probed(self, entry: Entry) -> None:
        """The probe of ``entry``'s folder ended without teaching its size (it failed)."""
        with self._lock:
            self.probing.discard(self._folder(entry))

    def _get(self, entry: Entry, prio: Priority, tmp: str, size: int, ranged: bool,
             admit: Callable[[int], bool] | None = None) -> dict:
        """One CRT GET into ``tmp``, on a link slot held until it ends."""
        slot = Slot(self.link, prio)
        try:
            self.counters.add(requests=1)
            return self.crt.get(entry.ref.bucket, entry.ref.key, entry.version, tmp, size, self.crt_max, ranged,
                                admit)
        except NoRoom as e:
            raise NeedSpace(e.size) from None
        finally:
            slot.release()

    def fetch_sized(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict) -> Fetched:
        """One GET of the whole object through the CRT into a temp file; then the same checks as a
        botocore GET's whole answer, over the bytes read back from the file. Raises TooLarge."""
        uri, size = entry.uri, entry.size
        assert size is not None
        if not admit(size):
            raise NeedSpace(size)
        with temp_file(entry, self._new_temp, self._discard) as (fd, tmp):
            resp = self._get(entry, prio, tmp, size, False)
            etag = resp.get("ETag", "").strip('"')
            version = resp.get("VersionId") or entry.version or ""
            total = os.fstat(fd).st_size
            if resp.get("ContentLength", total) != total:
                raise BadResponse(f"{uri}: the answer says {resp['ContentLength']} bytes, {total} were written")
            self.counters.add(bytes=total)
            self.link.moved(total)
            confirm = False
            if total != size:
                if not entry.size_is_hint:
                    self.verifier.size_mismatch(entry, etag, total)
                log.info("%s is %d bytes in S3, %d when it was listed: fetching S3's", uri, total, size)
                confirm = True  # only a HEAD can say the body is the object (as for a botocore GET)
                if not admit(total):
                    raise NeedSpace(total)
            checks = self.verifier.settle(entry, resp, etag, True, total, confirm)
            digest = Digest(checks.expect, checks.also)
            read_into(digest, fd, 0, total)  # a small object, just written: from the page cache
            return seal(self.verifier, entry, fd, tmp, total, etag, version, checks, digest, seen)

    def fetch_unsized(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict) -> Fetched:
        """A prefetch of unknown size: its first ``crt_max`` bytes in one ranged CRT GET into the temp
        file, then as the module doc says. Raises Unranged, or ClientError 416 for an empty object."""
        try:
            return self._fetch_unsized(entry, admit, prio, seen)
        except BaseException:
            self._probed(entry)  # it failed before teaching its folder anything (else: a no-op)
            raise

    def _fetch_unsized(self, entry: Entry, admit: Callable[[int], bool], prio: Priority, seen: dict) -> Fetched:
        uri = entry.uri
        asked = first_span(self.crt_max)
        admitted: list[int] = []

        def admit_once(n: int) -> bool:
            admitted.append(n)
            return admit(n)

        with temp_file(entry, self._new_temp, self._discard) as (fd, tmp):
            # Admitted for its total before the CRT writes a byte: the answer's headers give it
            resp = self._get(entry, prio, tmp, self.crt_max, True, admit_once)
            etag = resp.get("ETag", "").strip('"')
            version = resp.get("VersionId") or entry.version or ""
            total, whole = first_answer(resp, asked)  # the CRT states the range as S3 sent it
            self.learn(entry, total)  # now: the folder's next objects need not wait for this one's rest
            written = os.fstat(fd).st_size
            if written != resp["ContentLength"]:
                raise BadResponse(f"{uri}: the answer says {resp['ContentLength']} bytes, {written} were written")
            self.counters.add(bytes=written)
            self.link.moved(written)
            if admitted != [total] and not admit(total):
                raise NeedSpace(total)
            if whole:
                checks = self.verifier.settle(entry, resp, etag, True, total)
                digest = Digest(checks.expect, checks.also)
                read_into(digest, fd, 0, total)  # a small object, just written: from the page cache
            else:
                preallocate(fd, uri, total)
                resp["Body"] = None  # its bytes are in the file already
                checks, digest = self.parts.rest(entry, resp, fd, total, etag, prio, asked, None)
            return seal(self.verifier, entry, fd, tmp, total, etag, version, checks, digest, seen)
