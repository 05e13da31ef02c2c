"""s3cache: a verified local SSD cache of S3 objects, prefetched in manifest order for training jobs.

``from s3cache import resolve`` is all a training job needs; this module imports neither boto3 nor
TensorFlow, so readers start fast and the daemon never loads TensorFlow.

Invariant: importing the package loads its errors and version alone. ``resolve``, ``iter_resolve`` and
``worker_share`` are loaded on first access (PEP 562 ``__getattr__``), so the daemon and the command
line, which import ``s3cache.<subpackage>`` and so this package first, never load the readers' resolve
code they do not use.
"""

from .errors import (
    CacheAccessDenied,
    CacheDirError,
    CacheFull,
    CacheLocked,
    ChecksumMismatch,
    ConfigError,
    DaemonNotRunning,
    FetchFailed,
    ManifestError,
    ObjectChanged,
    OutOfScope,
    PermissionDenied,
    ProtocolError,
    ResolveTimeout,
    S3CacheError,
    UnsafeKey,
)
from .version import __version__

# name -> the module that defines it, imported on first access (see the module doc)
_LAZY = {"resolve": "s3cache.reader.resolve", "iter_resolve": "s3cache.reader.resolve",
         "worker_share": "s3cache.reader.workers"}


def __getattr__(name: str):
    """``s3cache.resolve`` and friends: their module imported now, the name cached in this package."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 's3cache' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def manifest_uris(path, *, endpoint_url: str | None = None, region: str | None = None) -> list[str]:
    """The manifest's URIs in order, ``prefix/`` lines expanded by listing them, exactly as the daemon
    expands the manifest: the file list every worker must build for ``--shard`` (see
    ``s3cache.fetch.uris``). Raises ManifestError (file and line) or FetchFailed (a prefix not listed)."""
    # Loaded on call: listing a prefix needs boto3, which `import s3cache` must never load (readers start
    # fast); a static import would put boto3 behind this package for the import-linter contract too.
    import importlib

    uris = importlib.import_module("s3cache.fetch.uris")
    return uris.manifest_uris(path, endpoint_url=endpoint_url, region=region)


__all__ = [
    "resolve",
    "iter_resolve",
    "manifest_uris",
    "worker_share",
    "S3CacheError",
    "CacheAccessDenied",
    "CacheDirError",
    "CacheFull",
    "CacheLocked",
    "ChecksumMismatch",
    "ConfigError",
    "DaemonNotRunning",
    "FetchFailed",
    "ManifestError",
    "ObjectChanged",
    "OutOfScope",
    "PermissionDenied",
    "ProtocolError",
    "ResolveTimeout",
    "UnsafeKey",
    "__version__",
]
