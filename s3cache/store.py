"""The cache directory on disk: its layout, the daemon lock, temp files, publishing and removal.

Publishing is the one place bytes become visible to readers, and its order is the crash-safety rule:
the bytes are verified and fsync'd in the temp file, a ``publishing`` intent is committed to the index,
the file is renamed into place, its directory is fsync'd, and only then is the row marked ``ready``.
A crash anywhere leaves either no visible file or a visible file that was verified before the rename.

Trust: the root and ``.s3cache`` must be the daemon's own (see trust.py). Below them every step goes
through a directory descriptor opened with O_NOFOLLOW, so a symlink planted anywhere in the cache can
never lead a write, an unlink or a chmod outside it. Directories for a key exist only while it has a file:
they are made when it is published and removed (up to its bucket dir) when it goes.

Modes never depend on the umask: files 0640 and directories 0750 (0644/0755 with ``world_readable``),
all in the cache root's group; private state is the daemon's alone except the lease lock (0640) and the
sockets (0660), which readers of the group need.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from . import paths, trust
from .tree import DIR_FLAGS, Tree, close_all, split
from .errors import CacheDirError, CacheLocked, NameFoldingFilesystem, UntrustedCacheDir
from .refs import ObjectRef

log = logging.getLogger("s3cache.store")

LEASE_LOCK = "lease.lock"


@dataclass(frozen=True)
class Layout:
    """Where everything lives under a cache dir. Pure: creating nothing, checking nothing."""

    root: str

    @property
    def private(self) -> str:
        return os.path.join(self.root, paths.PRIVATE_DIR)

    @property
    def tmp(self) -> str:
        return os.path.join(self.private, "tmp")

    @property
    def index(self) -> str:
        return os.path.join(self.private, "index")

    @property
    def quarantine(self) -> str:
        return os.path.join(self.private, "quarantine")

    @property
    def lock(self) -> str:
        return os.path.join(self.private, "lock")

    @property
    def lease_lock(self) -> str:
        return os.path.join(self.private, LEASE_LOCK)

    @property
    def control_socket(self) -> str:
        return os.path.join(self.private, "ctl.sock")

    @property
    def use_socket(self) -> str:
        return os.path.join(self.private, "use.sock")

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)


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


class Store:
    """The daemon's handle on the cache dir. Only the daemon (holding the lock) writes through it.

    Invariants while open: the root, ``.s3cache``, its ``tmp`` and ``quarantine`` are held as descriptors
    checked once (owned by the daemon's uid, writable by nobody else), and every path below them is
    reached from those descriptors without following a symlink, so nothing the store does lands outside
    the root. Every file and directory it makes has ``file_mode``/``dir_mode`` and group ``gid``
    whatever the umask. A key's directories exist only while some file needs them.
    """

    def __init__(self, root: str, *, world_readable: bool = False,
                 name_probe: Callable[[int], list[str]] = default_name_probe) -> None:
        self.layout = Layout(os.path.abspath(root))
        self.world_readable = world_readable
        self.file_mode = 0o644 if world_readable else 0o640
        self.dir_mode = 0o755 if world_readable else 0o750
        self.gid = -1  # the cache root's group (set by open)
        self._name_probe = name_probe
        self._lock_fd: int | None = None
        self._root_fd: int | None = None
        self._priv_fd: int | None = None
        self._tmp_fd: int | None = None
        self._quarantine_fd: int | None = None
        self._tree: Tree | None = None

    # -- setup -------------------------------------------------------------------------------------

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
        self._root_fd = trust.open_root(lay.root, self.dir_mode)
        self.gid = self._group_for(os.fstat(self._root_fd).st_gid)
        self._tree = Tree(self._root_fd, self.gid, self.dir_mode)
        try:
            self._priv_fd = trust.open_private(self._root_fd, paths.PRIVATE_DIR, lay.private, "private dir")
            trust.check_owned(self._priv_fd, lay.private, "private dir")
            # setgid: what others create in it by path (the sockets) gets the cache's group too
            self.tree.own(self._priv_fd, 0o2750)
            self._take_lock()
            self._tmp_fd = self._private_dir("tmp", lay.tmp)
            self._quarantine_fd = self._private_dir("quarantine", lay.quarantine)
            os.close(self._private_dir("index", lay.index))
            fd = self._private_file(LEASE_LOCK, os.O_RDONLY, 0o640)  # readers flock it: group-readable
            os.close(fd)
        except PermissionError as e:
            raise CacheDirError(f"cache dir {lay.root} is not writable: {e.strerror}") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise CacheDirError(f"cache dir {lay.root} is on a read-only filesystem") from None
            raise CacheDirError(f"cannot set up cache dir {lay.root}: {e.strerror}") from None
        folds = self._name_probe(self._tmp_fd)
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
        assert self._priv_fd is not None
        fd = trust.open_private(self._priv_fd, name, path, "private dir")
        os.fchmod(fd, 0o700)
        return fd

    def _private_file(self, name: str, flags: int, mode: int) -> int:
        assert self._priv_fd is not None
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self._priv_fd)
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
        self._lock_fd = fd

    def _tighten_top_level(self) -> None:
        """Give the top-level data dirs (buckets, ``.h``) this store's mode and group: an older version
        left them 0755, and closing them is what keeps its 0644 files from other users."""
        assert self._root_fd is not None
        me = os.geteuid()
        for name in os.listdir(self._root_fd):
            if name == paths.PRIVATE_DIR:
                continue
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=self._root_fd)
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
        assert self._priv_fd is not None
        return os.open(LEASE_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._priv_fd)

    @property
    def tree(self) -> Tree:
        assert self._tree is not None, "the store is not open"
        return self._tree

    def close(self) -> None:
        self._tree = None
        for name in ("_lock_fd", "_tmp_fd", "_quarantine_fd", "_priv_fd", "_root_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    # -- temp files --------------------------------------------------------------------------------

    def new_temp(self, hint: str) -> tuple[int, str]:
        """An empty private temp file (fd, path) under .s3cache/tmp; the caller owns both."""
        assert self._tmp_fd is not None
        hint = hint[:40].replace("/", "_").replace("\x00", "_")  # a listed key may hold either
        name = f"{hint}.{os.getpid()}.{os.urandom(6).hex()}.part"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._tmp_fd)
        try:
            self.tree.own(fd, 0o600)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=self._tmp_fd)
            raise
        return fd, os.path.join(self.layout.tmp, name)

    def _tmp_name(self, tmp_path: str) -> str:
        assert self._tmp_fd is not None, "the store is not open"  # never unlink relative to the cwd
        if os.path.dirname(tmp_path) != self.layout.tmp:
            raise CacheDirError(f"{tmp_path} is not one of this cache's temp files")
        return os.path.basename(tmp_path)

    def clean_tmp(self) -> int:
        """Remove every temp file (left by a crash or an aborted download). Returns how many."""
        assert self._tmp_fd is not None
        n = 0
        for name in os.listdir(self._tmp_fd):
            try:
                os.unlink(name, dir_fd=self._tmp_fd)
                n += 1
            except FileNotFoundError:
                pass
        return n

    def discard(self, tmp_path: str) -> None:
        try:
            os.unlink(self._tmp_name(tmp_path), dir_fd=self._tmp_fd)
        except FileNotFoundError:
            pass

    # -- placement and publishing ------------------------------------------------------------------

    def plan(self, ref: ObjectRef, planned: Collection[str] = ()) -> str:
        """The relative path this object would take now, without touching the disk.

        ``planned``: paths already chosen for files of the same batch that are not renamed yet.
        """
        for rel in paths.candidates(ref):
            if self.tree.is_free(rel, planned):
                return rel
        raise CacheDirError(f"no safe place for {ref.uri} in {self.layout.root}")

    def prepare(self, ref: ObjectRef, planned: Collection[str] = ()) -> str:
        """The relative path this object will take, with its parent directories created (publish makes
        them too, so plan() is enough before it; this stays for callers that want them now)."""
        for rel in paths.candidates(ref):
            if not self.tree.is_free(rel, planned):
                continue
            try:
                close_all(self.tree.walk(split(rel)[:-1], create=True))
            except NotADirectoryError:
                continue
            return rel
        raise CacheDirError(f"no safe place for {ref.uri} in {self.layout.root}")

    def publish(self, items: Iterable[tuple[str, str]]) -> list[Exception | None]:
        """Rename verified, fsync'd temp files to their planned relative paths (making the directories
        on the way), then fsync each touched directory once, and the parents of new ones. Returns, per
        item, None or the error that kept it from publishing (a file or symlink in the way:
        NotADirectoryError; a directory at the place: IsADirectoryError; a bad path: CacheDirError).

        The caller commits ``ready`` rows only after this returns, so a row never points at a directory
        entry that a power loss could still take back.
        """
        sync: set[str] = set()
        errors: list[Exception | None] = []
        for tmp_path, rel in items:
            try:
                self._publish_one(tmp_path, rel, sync)
            except (OSError, CacheDirError) as e:
                errors.append(e)
                continue
            errors.append(None)
        for d in sync:
            self.tree.fsync_dir(d)
        return errors

    def _publish_one(self, tmp_path: str, rel: str, sync: set[str]) -> None:
        name = self._tmp_name(tmp_path)
        parts = split(rel)
        os.chmod(name, self.file_mode, dir_fd=self._tmp_fd)  # .s3cache/tmp is ours alone: no links in it
        for attempt in range(3):
            made: list[int] = []
            fds = self.tree.walk(parts[:-1], create=True, made=made)
            try:
                os.rename(name, parts[-1], src_dir_fd=self._tmp_fd, dst_dir_fd=fds[-1])
            except FileNotFoundError:
                os.stat(name, dir_fd=self._tmp_fd, follow_symlinks=False)  # raises if the temp file is gone
                if attempt == 2:
                    raise
                continue  # a removal emptied and pruned a parent between the walk and the rename
            finally:
                close_all(fds)
            sync.add("/".join(parts[:-1]))
            sync.update("/".join(parts[:i]) for i in made)  # a new directory's entry in its parent
            return

    def remove(self, rel: str) -> None:
        """Delete a published file (eviction), then its directories that became empty. Readers holding
        the file open keep their bytes."""
        parts = split(rel)
        try:
            fds = self.tree.walk(parts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            try:
                os.unlink(parts[-1], dir_fd=fds[-1])
            except FileNotFoundError:
                pass
            self.tree.prune(parts, fds)
        finally:
            close_all(fds)

    @staticmethod
    def quarantine_name(rel: str, when: float) -> str:
        """A unique name under 255 bytes: time, a hash of the path, and the path's end cut by bytes."""
        digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        tail = rel.replace("/", "%2F").encode("utf-8", "surrogateescape")[-160:]
        return f"{int(when)}-{digest}-{os.urandom(3).hex()}-" + tail.decode("utf-8", "ignore")

    def quarantine(self, rel: str) -> str:
        """Move a file that failed re-verification out of readers' reach; returns its new path.
        Raises OSError (FileNotFoundError if it is gone) and leaves the file where it was on failure."""
        assert self._quarantine_fd is not None
        parts = split(rel)
        fds = self.tree.walk(parts[:-1], create=False)
        try:
            dest = self.quarantine_name(rel, time.time())
            os.rename(parts[-1], dest, src_dir_fd=fds[-1], dst_dir_fd=self._quarantine_fd)
            os.chmod(dest, 0o600, dir_fd=self._quarantine_fd)
            self.tree.prune(parts, fds)
        finally:
            close_all(fds)
        return os.path.join(self.layout.quarantine, dest)

    def take_back(self, quarantined: str) -> str:
        """Move a file ``quarantine`` set aside back to a new temp path (to publish it again once it is
        verified). Raises OSError (FileNotFoundError if it is gone)."""
        assert self._quarantine_fd is not None and self._tmp_fd is not None
        name = os.path.basename(quarantined)
        if os.path.dirname(quarantined) != self.layout.quarantine or name in ("", ".", ".."):
            raise CacheDirError(f"{quarantined} is not in this cache's quarantine")
        tmp = f"held.{os.getpid()}.{os.urandom(6).hex()}.part"
        os.rename(name, tmp, src_dir_fd=self._quarantine_fd, dst_dir_fd=self._tmp_fd)
        return os.path.join(self.layout.tmp, tmp)

    def exists(self, rel: str) -> bool:
        """A regular file at ``rel``, reached without following symlinks."""
        try:
            parts = split(rel)
            fds = self.tree.walk(parts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError, CacheDirError):
            return False
        try:
            return stat.S_ISREG(os.stat(parts[-1], dir_fd=fds[-1], follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False
        finally:
            close_all(fds)

    def free_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def total_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_blocks * st.f_frsize

    def free_fraction(self) -> float:
        st = os.statvfs(self.layout.root)
        return st.f_bavail / st.f_blocks if st.f_blocks else 0.0
