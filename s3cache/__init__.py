"""s3cache: a verified local SSD cache of S3 objects, prefetched in manifest order for training jobs.

``from s3cache import resolve`` is all a training job needs; this module imports neither boto3 nor
TensorFlow, so readers start fast and the daemon never loads TensorFlow.
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
from .reader.resolve import iter_resolve, resolve
from .version import __version__

__all__ = [
    "resolve",
    "iter_resolve",
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
