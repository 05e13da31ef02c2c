"""The cache directory on disk: temp files, placement, publishing, removal and quarantine.

Taking the dir (trust checks, the private layout, the one-daemon lock) is ``cachedir``; where things
live is ``layout`` (re-exported here).

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

import hashlib
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable

from s3cache.errors import CacheDirError
from s3cache.manifest.refs import ObjectRef

from . import paths
from .cachedir import CacheDir, default_name_probe
from .layout import LEASE_LOCK, SUPERSEDED_BIT, Layout  # noqa: F401  (re-exported: readers have always found it here)
from .tree import Tree, close_all, split

# Files a failed re-verification set aside are evidence, not cache: the newest few stay for a person to
# look at (within a byte budget the daemon gives, counted against --max-size); older ones go.
QUARANTINE_KEEP = 8
QUARANTINE_SHARE = 64  # the quarantine's byte budget: this fraction of --max-size


class Store:
    """The daemon's handle on the cache dir. Only the daemon (holding the lock) writes through it.

    Invariants while open: the root, ``.s3cache``, its ``tmp`` and ``quarantine`` are held as descriptors
    checked once (owned by the daemon's uid, writable by nobody else), and every path below them is
    reached from those descriptors without following a symlink, so nothing the store does lands outside
    the root. Every file and directory it makes has ``file_mode``/``dir_mode`` and group ``gid``
    whatever the umask. A key's directories exist only while some file needs them.
    Taking the dir (trust, layout, lock, modes) is ``cachedir.CacheDir``; the store holds it.
    """

    def __init__(self, root: str, *, world_readable: bool = False,
                 name_probe: Callable[[int], list[str]] = default_name_probe) -> None:
        self.layout = Layout(os.path.abspath(root))
        self.world_readable = world_readable
        self.file_mode = 0o644 if world_readable else 0o640
        self.dir_mode = 0o755 if world_readable else 0o750
        self._dir = CacheDir(self.layout, self.dir_mode, name_probe)

    def open(self) -> None:
        """Check and create the layout, take the one-daemon-per-dir lock (raises CacheLocked), and
        refuse an untrusted dir (UntrustedCacheDir) or a name-folding filesystem (NameFoldingFilesystem)."""
        self._dir.open()

    def close(self) -> None:
        self._dir.close()

    @property
    def gid(self) -> int:
        """The cache root's group (set by open), given to every file and directory the store makes."""
        return self._dir.gid

    @property
    def tree(self) -> Tree:
        return self._dir.tree

    @property
    def _tmp_fd(self) -> int | None:
        return self._dir.tmp_fd

    @property
    def _quarantine_fd(self) -> int | None:
        return self._dir.quarantine_fd

    def open_lease_lock(self) -> int:
        """A new read-only descriptor on ``.s3cache/lease.lock`` (for the daemon's exclusive flock)."""
        return self._dir.open_lease_lock()

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

    def mark_superseded(self, rel: str, inode: int | None = None) -> bool:
        """Set ``SUPERSEDED_BIT`` on the published file at ``rel`` (readers' ``resolve`` then passes it
        by). Its permissions and bytes stay: whoever has it open, or resolved it earlier, still reads it.
        False if there is no regular file there, or not the one with ``inode`` (when given), or the
        filesystem did not keep the bit (the caller must then take the file out of readers' reach
        another way). Idempotent."""
        try:
            parts = split(rel)
            fds = self.tree.walk(parts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError, CacheDirError):
            return False
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fds[-1])
        except OSError:  # gone, or a symlink (ELOOP): nothing of ours to mark
            return False
        finally:
            close_all(fds)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (inode is not None and st.st_ino != inode):
                return False
            if not st.st_mode & SUPERSEDED_BIT:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | SUPERSEDED_BIT)
            return bool(os.fstat(fd).st_mode & SUPERSEDED_BIT)
        finally:
            os.close(fd)

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

    def quarantined(self) -> list[tuple[str, int]]:
        """(name, bytes) of every file in the quarantine dir, oldest set aside first. Proportional to
        the quarantine, which ``prune_quarantine`` bounds."""
        assert self._quarantine_fd is not None
        out = []
        with os.scandir(self._quarantine_fd) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((st.st_ctime_ns, e.name, st.st_size))
        # the rename (and the chmod after it) into the quarantine set ctime: when it was set aside, to
        # the nanosecond (the name's time is whole seconds)
        out.sort()
        return [(name, size) for _, name, size in out]

    def prune_quarantine(self, budget: int, keep: int = QUARANTINE_KEEP,
                         protect: Collection[str] = ()) -> tuple[int, int]:
        """Bound the quarantine: remove its oldest files until at most ``keep`` files and ``budget``
        bytes remain (files count against --max-size while they stay). The newest file is always kept
        (the evidence of the latest mismatch, whose path ``verify`` just reported), and so is every name
        in ``protect`` (files a rebuild set aside unverified, re-checked at the next start). Returns
        (files, bytes) left."""
        files = self.quarantined()
        count, total = len(files), sum(n for _, n in files)
        for name, size in files[:-1]:  # oldest first; never the newest
            if count <= keep and total <= budget:
                break
            if name in protect:
                continue
            try:
                os.unlink(name, dir_fd=self._quarantine_fd)
            except FileNotFoundError:
                pass
            count, total = count - 1, total - size
        return count, total

    def take_out(self, rel: str, quarantine: bool) -> tuple[str | None, str | None]:
        """Take a published file out of readers' reach: quarantine it (or remove it if that fails: a corrupt
        file must not stay readable), or just remove it. Returns (quarantine path, what went wrong); raises
        OSError when the file could be neither moved nor removed."""
        if not quarantine:
            self.remove(rel)
            return None, None
        try:
            return self.quarantine(rel), None
        except FileNotFoundError:
            return None, None  # gone already: out of reach is all we want
        except OSError as e:
            self.remove(rel)
            return None, f"could not quarantine it ({e.strerror or e}); removed it instead"

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
