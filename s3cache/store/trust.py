"""Whether a cache dir may be trusted, and whether its filesystem keeps distinct names apart.

A daemon (often root) writes, empties and chmods things under its cache dir. If another user controls
that dir, or its private ``.s3cache``, they could plant symlinks that send those writes elsewhere. So a
cache root and ``.s3cache`` must be owned by the daemon's uid and writable by nobody else; everything
below them is then reachable only through directory descriptors opened without following symlinks.

The name probe is separate and injectable (``name_folding`` takes any ``ProbeDir``) because the kernel
that runs the tests cannot make a case-insensitive filesystem: a fake directory stands in for one.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from typing import Protocol

from s3cache.errors import CacheDirError, UntrustedCacheDir

from .tree import DIR_FLAGS


def _who(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_owned(fd: int, path: str, what: str) -> os.stat_result:
    """Raise UntrustedCacheDir unless the directory open at ``fd`` is ours and writable only by us."""
    st = os.fstat(fd)
    me = os.geteuid()
    if st.st_uid != me:
        raise UntrustedCacheDir(
            f"{what} {path} is owned by {_who(st.st_uid)}, not by {_who(me)} that runs the daemon, so its "
            f"owner could redirect the daemon's writes; remove it and let the daemon create it, or "
            f"`chown {me} {path}` if it is yours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH else \
            "its group" if st.st_mode & stat.S_IWGRP else "others"
        raise UntrustedCacheDir(
            f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), who could plant "
            f"files or symlinks in it; `chmod go-w {path}`")
    return st


def setup_error(path: str, e: OSError) -> CacheDirError:
    """An OSError met while making the cache dir, as the error a user can act on (it names the dir)."""
    if isinstance(e, PermissionError):
        return CacheDirError(f"cache dir {path} is not writable: {e.strerror}")
    if e.errno == errno.EROFS:
        return CacheDirError(f"cache dir {path} is on a read-only filesystem")
    return CacheDirError(f"cannot set up cache dir {path}: {e.strerror}")


def open_root(path: str, mode: int) -> int:
    """Create the cache root if needed (``mode``, whatever the umask) and return a descriptor on it.

    The root itself may be a symlink (an operator pointing /var/cache/s3cache at an SSD), but only one
    owned by the daemon's uid or root: a symlink another user planted in a shared parent is refused.
    """
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, 0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            created = False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise CacheDirError(f"cache dir {path} is not a directory") from None
    except OSError as e:
        raise setup_error(path, e) from None
    try:
        st = os.fstat(fd)
        link = os.lstat(path)
        if stat.S_ISLNK(link.st_mode):
            if link.st_uid not in (os.geteuid(), 0):
                raise UntrustedCacheDir(
                    f"cache dir {path} is a symlink owned by {_who(link.st_uid)}, who could point it "
                    f"anywhere; remove it, or point --cache-dir at a directory the daemon owns")
        elif (link.st_dev, link.st_ino) != (st.st_dev, st.st_ino):
            raise UntrustedCacheDir(f"cache dir {path} was replaced while it was being opened")
        check_owned(fd, path, "cache dir")
        if created:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(parent_fd: int, name: str, path: str, what: str) -> int:
    """Create (0700) or open a directory ``name`` under ``parent_fd`` without following a symlink."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UntrustedCacheDir(
                f"{what} {path} is not a directory (a symlink or a file); the daemon creates it itself: "
                f"remove it") from None
        raise


# == names that differ only in case or Unicode normalization ========================================


class ProbeDir(Protocol):
    """The little a name probe needs of a directory."""

    def create(self, name: str) -> None:
        """Create an empty file; FileExistsError when the filesystem already has that name."""

    def remove(self, name: str) -> None: ...


class FdDir:
    """A real directory, by descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def create(self, name: str) -> None:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self.fd))

    def remove(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)


def name_folding(d: ProbeDir, tag: str | None = None) -> list[str]:
    """Which distinctions the directory's filesystem erases: "case" ("a" and "A" are one file),
    "unicode normalization" (NFC "é" and NFD "é" are one file). Empty on an ordinary POSIX filesystem.
    Leaves nothing behind."""
    tag = tag or os.urandom(4).hex()
    pairs = (("case", f"s3cache-probe-{tag}-a", f"S3CACHE-PROBE-{tag}-A"),
             ("unicode normalization", f"s3cache-probe-{tag}-\u00e9", f"s3cache-probe-{tag}-e\u0301"))
    folds = []
    for kind, a, b in pairs:
        d.create(a)
        try:
            try:
                d.create(b)
            except FileExistsError:
                folds.append(kind)
                continue
            d.remove(b)
        finally:
            d.remove(a)
    return folds
