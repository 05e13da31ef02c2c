"""What a fetch hands back, and the last steps every way of fetching shares: a verified temp file
(``Fetched``), the refusal when the cache has no room for an object whose size just became known
(``NeedSpace``), reserving a temp file's blocks (``preallocate``) and checking and syncing it once every
byte is in (``seal``).

Invariant: ``seal`` returns only for a file of exactly ``total`` bytes whose digest passed the checks
(or whose method is ``size``), its data on disk.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from s3cache.errors import S3CacheError
from s3cache.manifest.parse import Entry

from .checksum import Digest
from .retry import BadResponse
from .stream import DiskFull
from .verifier import Checks, Verifier


class NeedSpace(S3CacheError):
    """The object's size became known and the cache has no room for it yet."""

    def __init__(self, size: int) -> None:
        self.size = size
        super().__init__(f"no room for {size} bytes")


@dataclass(frozen=True)
class Fetched:
    """A verified temp file ready to publish."""

    tmp_path: str
    size: int
    etag: str
    version: str
    method: str
    crc32c: str
    also: tuple[str, ...] = ()  # claims checked beside ``method`` (the manifest's, when S3's was stronger)


@contextmanager
def temp_file(entry: Entry, new_temp: Callable[[str], tuple[int, str]],
              discard: Callable[[str], None]) -> Iterator[tuple[int, str]]:
    """An open temp file for ``entry`` (``new_temp``'s ``(fd, path)``), closed on leaving; removed
    (``discard``) if the block raised, so a failed attempt leaves none."""
    fd, tmp = new_temp(entry.ref.key.rsplit("/", 1)[-1])
    try:
        yield fd, tmp
    except BaseException:
        os.close(fd)
        discard(tmp)
        raise
    os.close(fd)


def preallocate(fd: int, uri: str, total: int) -> None:
    """Reserve the object's blocks in the temp file: a full disk is DiskFull now, not mid-stream."""
    if total:
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left for {uri} ({total} bytes)", total) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def seal(verifier: Verifier, entry: Entry, fd: int, tmp: str, total: int, etag: str, version: str,
         checks: Checks, digest: Digest, seen: dict) -> Fetched:
    """The temp file ``tmp`` (open as ``fd``) holds the object's ``total`` bytes, all fed to ``digest``:
    check them, fsync the data, and name the result. ``seen``: the wrong digests of earlier attempts
    (``Verifier``)."""
    # Writes never leave their ranges; the file's length is the object's all the same.
    os.ftruncate(fd, total)
    if os.fstat(fd).st_size != total:
        raise BadResponse(f"{entry.uri}: the temp file is {os.fstat(fd).st_size} bytes, not {total}")
    method = verifier.verify(entry, etag, total, checks, digest, fd, seen)
    os.fdatasync(fd)  # the data, and the size it was preallocated to; the rename is fsync'd later
    return Fetched(tmp, total, etag, version, method, digest.local_crc32c, tuple(e.method for e in checks.also))
