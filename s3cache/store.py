"""The cache directory on disk: its layout, the daemon lock, temp files, publishing and removal.

Publishing is the one place bytes become visible to readers, and its order is the crash-safety rule:
the bytes are verified and fsync'd in the temp file, a ``publishing`` intent is committed to the index,
the file is renamed into place, its directory is fsync'd, and only then is the row marked ``ready``.
A crash anywhere leaves either no visible file or a visible file that was verified before the rename.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from . import paths
from .errors import CacheDirError, CacheLocked
from .refs import ObjectRef


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
    def control_socket(self) -> str:
        return os.path.join(self.private, "ctl.sock")

    @property
    def use_socket(self) -> str:
        return os.path.join(self.private, "use.sock")

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The daemon's handle on the cache dir. Only the daemon (holding the lock) writes through it."""

    def __init__(self, root: str) -> None:
        self.layout = Layout(os.path.abspath(root))
        self._lock_fd: int | None = None
        self._real_root = ""

    # -- setup -------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the layout if needed and take the one-daemon-per-dir lock (raises CacheLocked)."""
        lay = self.layout
        try:
            os.makedirs(lay.root, mode=0o755, exist_ok=True)
            if not os.path.isdir(lay.root):
                raise CacheDirError(f"cache dir {lay.root} is not a directory")
            os.makedirs(lay.private, mode=0o755, exist_ok=True)
            for d in (lay.tmp, lay.quarantine):
                os.makedirs(d, mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)
            os.chmod(lay.private, 0o755)
        except PermissionError as e:
            raise CacheDirError(f"cache dir {lay.root} is not writable: {e.strerror}") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise CacheDirError(f"cache dir {lay.root} is on a read-only filesystem") from None
            raise CacheDirError(f"cannot set up cache dir {lay.root}: {e.strerror}") from None
        self._real_root = os.path.realpath(lay.root)
        self._take_lock()

    def _take_lock(self) -> None:
        path = self.layout.lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CacheLocked(self.layout.root, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- temp files --------------------------------------------------------------------------------

    def new_temp(self, hint: str) -> tuple[int, str]:
        """An empty private temp file (fd, path) under .s3cache/tmp; the caller owns both."""
        name = f"{hint[:40]}.{os.getpid()}.{os.urandom(6).hex()}.part"
        path = os.path.join(self.layout.tmp, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, path

    def clean_tmp(self) -> int:
        """Remove every temp file (left by a crash or an aborted download). Returns how many."""
        n = 0
        for name in os.listdir(self.layout.tmp):
            try:
                os.unlink(os.path.join(self.layout.tmp, name))
                n += 1
            except FileNotFoundError:
                pass
        return n

    @staticmethod
    def discard(tmp_path: str) -> None:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass

    # -- placement and publishing ------------------------------------------------------------------

    def _make_parent(self, rel: str, planned: Collection[str]) -> bool:
        """Create the parent directories of ``rel`` inside the root; False if a file is in the way.

        Walks one component at a time with lstat so that a symlink planted in the cache dir can never
        lead a write outside it. ``planned`` files count as in the way although not yet renamed there.
        """
        parts = rel.split("/")[:-1]
        cur = self.layout.root
        for i, part in enumerate(parts):
            if "/".join(parts[: i + 1]) in planned:
                return False
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                try:
                    os.mkdir(cur, 0o755)
                    continue
                except FileExistsError:
                    st = os.lstat(cur)
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def prepare(self, ref: ObjectRef, planned: Collection[str] = ()) -> str:
        """The relative path this object will take, with its parent directories created.

        ``planned``: paths already chosen for files of the same batch that are not renamed yet.
        """
        for rel in paths.candidates(ref):
            target = self.layout.abspath(rel)
            if not self._make_parent(rel, planned):
                continue
            try:
                if stat.S_ISDIR(os.lstat(target).st_mode):
                    continue  # another key's directory holds this name: take the hashed form
            except FileNotFoundError:
                pass
            return rel
        raise CacheDirError(f"no safe place for {ref.uri} in {self.layout.root}")

    def publish(self, items: Iterable[tuple[str, str]]) -> list[Exception | None]:
        """Rename verified, fsync'd temp files to their prepared relative paths, then fsync each
        touched directory once. Returns, per item, None or the error that kept it from publishing.

        The caller commits ``ready`` rows only after this returns, so a row never points at a directory
        entry that a power loss could still take back.
        """
        dirs: set[str] = set()
        errors: list[Exception | None] = []
        for tmp_path, rel in items:
            target = self.layout.abspath(rel)
            parent = os.path.dirname(target)
            try:
                if not paths.is_within(self._real_root or self.layout.root, parent):
                    raise CacheDirError(f"refusing to write {rel!r} outside the cache dir")
                os.chmod(tmp_path, 0o644)
                os.rename(tmp_path, target)
            except (OSError, CacheDirError) as e:
                errors.append(e)
                continue
            errors.append(None)
            dirs.add(parent)
        for d in dirs:
            _fsync_dir(d)
        return errors

    def remove(self, rel: str) -> None:
        """Delete a published file (eviction). Readers holding it open keep their bytes."""
        try:
            os.unlink(self.layout.abspath(rel))
        except FileNotFoundError:
            pass

    def quarantine(self, rel: str) -> str:
        """Move a file that failed re-verification out of readers' reach; returns its new path."""
        dest = os.path.join(self.layout.quarantine, f"{int(time.time())}-{rel.replace('/', '%2F')}"[:255])
        os.rename(self.layout.abspath(rel), dest)
        os.chmod(dest, 0o600)
        return dest

    def exists(self, rel: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.layout.abspath(rel)).st_mode)
        except FileNotFoundError:
            return False

    def free_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def total_bytes(self) -> int:
        st = os.statvfs(self.layout.root)
        return st.f_blocks * st.f_frsize

    def free_fraction(self) -> float:
        st = os.statvfs(self.layout.root)
        return st.f_bavail / st.f_blocks if st.f_blocks else 0.0
