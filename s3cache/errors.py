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
    """A manifest line is malformed. ``path`` and ``line`` point at it (line is 1-based)."""

    exit_code = 2

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.reason = message
        super().__init__(f"{path}:{line}: {message}")


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


class CacheFull(S3CacheError):
    """The cache cannot make room: everything resident is leased, pinned or still unread."""


class CacheLocked(S3CacheError):
    """Another daemon already serves this cache dir."""

    def __init__(self, cache_dir: str, pid: int | None) -> None:
        self.cache_dir = cache_dir
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"cache dir {cache_dir} is already served by {holder}")


class CacheDirError(S3CacheError):
    """The cache dir is unusable (read-only, vanished, not a directory)."""


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


class RequestRefused(ProtocolError):
    """The daemon refused a request as malformed or over a limit; ``code`` says which (see ``wire``)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"the daemon refused the request ({code}): {message}")
