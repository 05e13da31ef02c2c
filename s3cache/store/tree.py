"""The data part of a cache dir, reached only through directory descriptors that never follow a symlink.

Every path below the root is walked one segment at a time with ``openat(O_DIRECTORY | O_NOFOLLOW)``
from a descriptor on the root checked at open, so neither a planted symlink nor a renamed parent can
lead a mkdir, rename, unlink or chmod outside the cache. Directories made here get the cache's group
and mode whatever the umask; directories emptied by a removal are pruned up to (not including) the
top-level one, the bucket dir or ``.h``, so the root and ``.s3cache`` are never candidates.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Iterable, Iterator

from s3cache.errors import CacheDirError

from . import paths

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split(rel: str) -> list[str]:
    """The segments of a cache file's relative path; refuses anything paths.py never produces."""
    parts = rel.split("/")
    if len(parts) < 2 or parts[0] == paths.PRIVATE_DIR or any(p in ("", ".", "..") for p in parts):
        raise CacheDirError(f"refusing {rel!r}: not a place for a cache file")
    return parts


def _not_a_dir(where: str) -> NotADirectoryError:
    return NotADirectoryError(errno.ENOTDIR, "in the way: a file or a symlink, not a directory", where)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _parents(rel: str) -> list[str]:
    """The directories above ``rel``, outermost first: ``a/b/c`` -> ``a``, ``a/b``."""
    return [rel[:i] for i, c in enumerate(rel) if c == "/"]


class Planned(Collection[str]):
    """Paths chosen for the files of one batch that are not renamed yet, and every directory above
    them, so that ``Tree.is_free`` asks two set lookups per segment instead of scanning the batch
    (which made planning a publisher batch quadratic in its size). Invariant: ``dirs`` is exactly the
    set of strict parents of the paths in ``files``."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        for rel in paths:
            self.add(rel)

    def add(self, rel: str) -> None:
        self.files.add(rel)
        self.dirs.update(_parents(rel))

    def __contains__(self, rel: object) -> bool:
        return rel in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


class Tree:
    """Directories below ``root_fd``. Invariant: every descriptor it hands out was reached from
    ``root_fd`` without following a symlink; every directory it made has ``dir_mode`` and ``gid``."""

    def __init__(self, root_fd: int, gid: int, dir_mode: int) -> None:
        self.root_fd = root_fd
        self.gid = gid
        self.dir_mode = dir_mode

    def own(self, fd: int, mode: int) -> None:
        """Give the inode at ``fd`` the cache's group, then ``mode`` (after chown, which may drop setgid).
        A mode already right is left alone: every temp file is made with its mode (umask permitting),
        and a chmod is a journaled inode update per object, a stat is not."""
        st = os.fstat(fd)
        chowned = self.gid != -1 and st.st_gid != self.gid
        if chowned:
            os.fchown(fd, -1, self.gid)
        if chowned or stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)

    def walk(self, parts: list[str], create: bool, made: list[int] | None = None) -> list[int]:
        """Descriptors on the directories ``parts[0]``, ``parts[0]/parts[1]``, ... (the caller closes
        them). Missing ones are made when ``create`` (their indices go to ``made``), else
        FileNotFoundError; NotADirectoryError (filename: the path so far) when a file or symlink is in
        the way."""
        fds: list[int] = []
        cur = self.root_fd
        try:
            for i, part in enumerate(parts):
                try:
                    fd = os.open(part, DIR_FLAGS, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        raise
                    fd = self._mkdir(cur, part, "/".join(parts[: i + 1]))
                    if made is not None:
                        made.append(i)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _not_a_dir("/".join(parts[: i + 1])) from None
                    raise
                fds.append(fd)
                cur = fd
        except BaseException:
            close_all(fds)
            raise
        return fds

    def _mkdir(self, parent_fd: int, name: str, where: str) -> int:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)  # opened up to dir_mode once it has its group
            made = True
        except FileExistsError:
            made = False
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _not_a_dir(where) from None
            raise
        if made:
            try:
                self.own(fd, self.dir_mode)
            except BaseException:
                os.close(fd)
                raise
        return fd

    @staticmethod
    def prune(parts: list[str], fds: list[int]) -> None:
        """Remove the now-empty directories of ``parts`` (open as ``fds``) bottom-up, never ``parts[0]``."""
        for i in range(len(fds) - 1, 0, -1):
            try:
                os.rmdir(parts[i], dir_fd=fds[i - 1])
            except OSError:
                return  # not empty (or already gone): the ones above are not empty either

    def is_free(self, rel: str, planned: Collection[str]) -> bool:
        """Whether a file could go to ``rel``: no file, symlink or planned file among its parents, no
        directory at the place itself, and no planned file beneath it. Looks only; creates nothing.
        Constant work in the size of ``planned`` when it is a ``Planned`` (any other collection is
        copied into one first)."""
        parts = split(rel)
        if not isinstance(planned, Planned):
            planned = Planned(planned)
        if any(d in planned.files for d in _parents(rel)):
            return False
        if rel in planned.dirs:
            return False  # a file planned under this name makes it a directory before this one lands
        try:
            fds = self.walk(parts[:-1], create=False)
        except NotADirectoryError:
            return False
        except FileNotFoundError:
            return True  # the rest of the way does not exist yet: publishing makes it
        try:
            st = os.stat(parts[-1], dir_fd=fds[-1], follow_symlinks=False)
        except FileNotFoundError:
            return True
        finally:
            close_all(fds)
        return not stat.S_ISDIR(st.st_mode)  # another key's directory holds this name

    def fsync_dir(self, rel_dir: str) -> None:
        if not rel_dir:
            os.fsync(self.root_fd)
            return
        try:
            fds = self.walk(rel_dir.split("/"), create=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # emptied and pruned since: nothing of this batch is left in it to make durable
        try:
            os.fsync(fds[-1])
        finally:
            close_all(fds)
