"""One exception tree for everything s3cache raises.

The library raises these; the CLI turns them into one line on stderr and an exit code.
Every class carries enough context (file, line, URI, S3 error code) to act on the message alone.
"""

from __future__ import annotations


class S3CacheError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class ConfigError(S3CacheError):
    """A setting is malformed (a size like ``12Q``, a negative lease, a bad cache dir)."""

    exit_code = 2


class ManifestError(S3CacheError):
    """A manifest line is malformed. ``path`` and ``line`` point at it (line is 1-based; None when the
    problem is the file as a whole, e.g. it cannot be opened)."""

    exit_code = 2

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.reason = message
        super().__init__(f"{path}: {message}" if line is None else f"{path}:{line}: {message}")


class ManifestUnstable(S3CacheError):
    """The manifest file is being written (it changed while it was read, or very recently): read it
    again after ``retry_after`` seconds rather than install what may be half of it."""

    def __init__(self, path: str, reason: str, retry_after: float, identity: object = None) -> None:
        self.path = path
        self.retry_after = retry_after
        self.identity = identity  # what the file looked like; pass it back as load(..., seen=)
        super().__init__(f"{path}: {reason}; reading it again in {retry_after:.2f}s")


class UnsafeKey(S3CacheError):
    """A bucket name or key cannot be stored safely (for example an invalid bucket name)."""


class ChecksumMismatch(S3CacheError):
    """Downloaded bytes do not match the expected checksum; nothing was published."""


class ObjectChanged(S3CacheError):
    """The object changed in S3 while it was being downloaded (HTTP 412 on an If-Match GET)."""


class FetchFailed(S3CacheError):
    """S3 refused the object for good (``code`` is the S3 error code, e.g. ``NoSuchKey``)."""

    def __init__(self, uri: str, code: str, message: str = "") -> None:
        self.uri = uri
        self.code = code
        self.reason = message
        text = f"{uri}: {code}"
        if message:
            text += f": {message}"
        super().__init__(text)


class OutOfScope(FetchFailed):
    """The daemon will not fetch this object for a reader: it is outside the demand scope (not in the
    manifest, not under one of its ``prefix/`` lines, not under ``serve --allow``). The message names the
    rule; no request was made to S3."""

    code = "OutOfScope"

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(uri, self.code, message)


class CacheFull(S3CacheError):
    """The cache cannot make room: everything resident is leased, pinned or still unread."""


class CacheLocked(S3CacheError):
    """Another process holds this cache dir's lock (``pid`` when that is a running process).

    ``recorded`` is the pid written in the lock file when it names no running process: then the lock
    is held by something other than the daemon that wrote it, and the message says so.
    """

    def __init__(self, cache_dir: str, pid: int | None, recorded: int | None = None) -> None:
        self.cache_dir = cache_dir
        self.pid = pid
        self.recorded = recorded
        if pid:
            text = f"cache dir {cache_dir} is already served by pid {pid}"
        elif recorded:
            text = (f"cache dir {cache_dir} is locked by another process (the pid {recorded} recorded in "
                    f"its lock file is not running; `fuser -v {cache_dir}/.s3cache/lock` shows the holder)")
        else:
            text = f"cache dir {cache_dir} is already served by another process"
        super().__init__(text)


class CacheDirError(S3CacheError):
    """The cache dir is unusable (read-only, vanished, not a directory)."""


class UntrustedCacheDir(CacheDirError):
    """The cache dir (or its private ``.s3cache``) is controlled by someone other than the daemon: owned
    by another user, writable by group or others, or a symlink another user placed. The message names
    the path and the fix."""


class NameFoldingFilesystem(CacheDirError):
    """The cache dir's filesystem treats names differing only in case or Unicode normalization as one
    (casefold ext4, exFAT, SMB, APFS): two keys would share one file."""


class ResolveTimeout(S3CacheError):
    """``resolve(timeout=...)`` expired before the file landed."""


class DaemonNotRunning(S3CacheError):
    """No daemon serves the cache dir, so a missing file would never arrive."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir
        super().__init__(
            f"no s3cache daemon serves {cache_dir}; start one with "
            f"`s3cache serve --cache-dir {cache_dir} --manifest MANIFEST`"
        )


class ProtocolError(S3CacheError):
    """The daemon and a client disagree about the control protocol (version skew)."""


class WrongChecksum(ChecksumMismatch):
    """The bytes S3 serves are stable but do not match a claim about them: S3's own checksum agrees with
    them and the manifest's does not, or three downloads hashed alike and both mismatched. Not a transfer
    error, so fetching again cannot help: it fails at once until the manifest or the object changes."""

    def __init__(self, uri: str, message: str) -> None:
        self.uri = uri
        super().__init__(f"{uri}: {message}")


class NoChecksum(FetchFailed):
    """Nothing stronger than its size can vouch for the object's bytes and checksums are required
    (``require_checksum``): it is not published."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, "NoChecksum",
                         "no checksum to verify it by (S3 has none, its ETag is not an MD5, the manifest gives "
                         "none): add sha256= to its manifest line, or upload it with a checksum")


class RequestRefused(ProtocolError):
    """The daemon refused a request as malformed or over a limit; ``code`` says which (see ``wire``)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"the daemon refused the request ({code}): {message}")


class RequestTooLarge(S3CacheError):
    """A request asks for more than the daemon takes in one go (e.g. too many ahead hints in a want)."""


class PermissionDenied(S3CacheError):
    """The client may not do this (e.g. pins need the daemon's user or root); the message names the rule."""


class CacheAccessDenied(PermissionDenied):
    """This process may not use the cache dir: a path readers need (the lease lock, the control socket,
    the cached files) is the cache dir's group's, and this user is not in that group. The message names
    the path, the group and the fix."""

    def __init__(self, path: str, cache_dir: str) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.group = _group_of(cache_dir)
        super().__init__(
            f"permission denied on {path}: readers of {cache_dir} must be in its group"
            f"{self.group and f' {self.group!r}'} "
            f"(join the daemon's group: `usermod -aG {self.group or 'GROUP'} USER`, then log in again; in a "
            f"container, add the group's id to supplementalGroups)")


def _group_of(cache_dir: str) -> str:
    """The name (else the number) of the cache dir's group; '' when the cache dir cannot be seen."""
    import grp
    import os

    try:
        gid = os.stat(cache_dir).st_gid
    except OSError:
        return ""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class PinQuotaExceeded(S3CacheError):
    """Pinning these objects would make pinned bytes exceed ``pin_quota`` of ``--max-size``."""
