"""Taking the cache dir: trust checks, the private layout, the one-daemon-per-dir lock, modes.

``CacheDir.open`` refuses a root or ``.s3cache`` another user controls (``trust``), creates the private
dirs (``tmp``, ``quarantine``, ``index``) and the lease lock, takes ``.s3cache/lock`` with ``flock``
(``CacheLocked`` names the pid that holds it), refuses a filesystem that folds names together, and gives
top-level data dirs an older version left open this store's mode and group.

Invariants while open: the root, ``.s3cache``, ``tmp`` and ``quarantine`` are held as descriptors checked
once (owned by the daemon's uid, writable by nobody else) and every later step starts from them, never
from a path that a symlink could redirect; ``.s3cache`` is 2750 (setgid: the sockets made in it by path
get the cache's group), ``tmp`` and ``quarantine`` 0700, ``lock`` 0600, ``lease.lock`` 0640 whatever the
umask; a failed ``open`` closes every descriptor it opened. What the daemon then does in the dir (temp
files, publishing, removal, quarantine) is ``store.Store``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable

from s3cache.errors import CacheLocked, NameFoldingFilesystem, UntrustedCacheDir

from . import paths, trust
from .layout import LEASE_LOCK, Layout
from .tree import DIR_FLAGS, Tree

log = logging.getLogger("s3cache.store")  # the store's messages, as before the split


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but running
    return True


def default_name_probe(fd: int) -> list[str]:
    """The real probe, in the directory open at ``fd``."""
    return trust.name_folding(trust.FdDir(fd))


class CacheDir:
    """The daemon's hold on a cache dir (see the module docstring for what it checks and keeps).

    ``gid``: the group every file and directory of the cache gets (the root's, when the daemon may give
    it; else its own). The descriptors are None until ``open`` and after ``close``."""

    def __init__(self, layout: Layout, dir_mode: int, name_probe: Callable[[int], list[str]]) -> None:
        self.layout = layout
        self.dir_mode = dir_mode
        self.gid = -1  # the cache root's group (set by open)
        self._name_probe = name_probe
        self.lock_fd: int | None = None
        self.root_fd: int | None = None
        self.priv_fd: int | None = None
        self.tmp_fd: int | None = None
        self.quarantine_fd: int | None = None
        self._tree: Tree | None = None

    def open(self) -> None:
        """Check and create the layout, take the one-daemon-per-dir lock (raises CacheLocked), and
        refuse an untrusted dir (UntrustedCacheDir) or a name-folding filesystem (NameFoldingFilesystem)."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        lay = self.layout
        self.root_fd = trust.open_root(lay.root, self.dir_mode)
        self.gid = self._group_for(os.fstat(self.root_fd).st_gid)
        self._tree = Tree(self.root_fd, self.gid, self.dir_mode)
        try:
            self.priv_fd = trust.open_private(self.root_fd, paths.PRIVATE_DIR, lay.private, "private dir")
            trust.check_owned(self.priv_fd, lay.private, "private dir")
            # setgid: what others create in it by path (the sockets) gets the cache's group too
            self.tree.own(self.priv_fd, 0o2750)
            self._take_lock()
            self.tmp_fd = self._private_dir("tmp", lay.tmp)
            self.quarantine_fd = self._private_dir("quarantine", lay.quarantine)
            os.close(self._private_dir("index", lay.index))
            fd = self._private_file(LEASE_LOCK, os.O_RDONLY, 0o640)  # readers flock it: group-readable
            os.close(fd)
        except OSError as e:
            raise trust.setup_error(lay.root, e) from None
        folds = self._name_probe(self.tmp_fd)
        if folds:
            raise NameFoldingFilesystem(
                f"cache dir {lay.root} is on a filesystem that does not keep names apart "
                f"({' or '.join(folds)}: two keys would share one file); put the cache on a "
                f"case-sensitive POSIX filesystem (ext4 without casefold, xfs, btrfs)")
        self._tighten_top_level()

    def _group_for(self, root_gid: int) -> int:
        """The cache root's group when the daemon may give files that group, else its own."""
        if os.geteuid() == 0 or root_gid == os.getegid() or root_gid in os.getgroups():
            return root_gid
        log.warning("the daemon is not in group %d of %s: cached files get group %d instead",
                    root_gid, self.layout.root, os.getegid())
        return os.getegid()

    def _private_dir(self, name: str, path: str) -> int:
        assert self.priv_fd is not None
        fd = trust.open_private(self.priv_fd, name, path, "private dir")
        os.fchmod(fd, 0o700)
        return fd

    def _private_file(self, name: str, flags: int, mode: int) -> int:
        assert self.priv_fd is not None
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.priv_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UntrustedCacheDir(f"{os.path.join(self.layout.private, name)} is a symlink; "
                                              f"the daemon creates it itself: remove it") from None
            raise
        try:
            self.tree.own(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _take_lock(self) -> None:
        fd = self._private_file("lock", os.O_RDWR, 0o600)  # the daemon's alone: no reader needs it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = int(holder) if holder.isdigit() else None
            if pid is not None and _pid_alive(pid):
                raise CacheLocked(self.layout.root, pid) from None
            raise CacheLocked(self.layout.root, None, recorded=pid) from None
        # A pid left by a dead daemon is just overwritten: only the flock says who serves the dir.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.lock_fd = fd

    def _tighten_top_level(self) -> None:
        """Give the top-level data dirs (buckets, ``.h``) this store's mode and group: an older version
        left them 0755, and closing them is what keeps its 0644 files from other users."""
        assert self.root_fd is not None
        me = os.geteuid()
        for name in os.listdir(self.root_fd):
            if name == paths.PRIVATE_DIR:
                continue
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=self.root_fd)
            except OSError:
                continue  # a file or a symlink: nothing the store made
            try:
                st = os.fstat(fd)
                if st.st_uid == me and (stat.S_IMODE(st.st_mode) != self.dir_mode or st.st_gid != self.gid):
                    self.tree.own(fd, self.dir_mode)
            finally:
                os.close(fd)

    def open_lease_lock(self) -> int:
        """A new read-only descriptor on ``.s3cache/lease.lock`` (for the daemon's exclusive flock)."""
        assert self.priv_fd is not None
        return os.open(LEASE_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.priv_fd)

    @property
    def tree(self) -> Tree:
        assert self._tree is not None, "the store is not open"
        return self._tree

    def close(self) -> None:
        self._tree = None
        for name in ("lock_fd", "tmp_fd", "quarantine_fd", "priv_fd", "root_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
