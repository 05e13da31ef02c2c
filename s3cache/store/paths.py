"""Where an object lives in the cache dir: a pure function of (bucket, key), never outside the dir.

Layout under the cache dir::

    <bucket>/<key>               readable form, for keys whose every segment is a safe file name
    .h/<hh>/<hash>/<basename>    hashed form, for every other key and for keys that collide
    .s3cache/                    private state (index, temp files, lock, sockets)

A key deeper than MAX_DEPTH segments, or longer than MAX_READABLE_BYTES, takes the hashed form too: a
readable path makes one directory per segment, and a hostile key must not make hundreds of them (nor a
path the kernel refuses).

Top-level names starting with a dot can never be buckets, so the three namespaces never meet.

Two distinct keys never share a path: readable paths are the key itself, hashed paths carry 128 bits
of SHA-256 over the bucket and key. One collision cannot be ruled out by a pure function: keys ``a``
and ``a/b`` need ``<bucket>/a`` to be both a file and a directory. Whichever lands second takes its
hashed form; that is why a reader looks at ``candidates()`` in order, and why the daemon records the
path it chose.
"""

from __future__ import annotations

import hashlib
import os
import re

from s3cache.manifest.refs import INVISIBLE, ObjectRef

PRIVATE_DIR = ".s3cache"
HASHED_DIR = ".h"
MAX_SEGMENT_BYTES = 255
MAX_DEPTH = 32  # key segments in a readable path (so at most 32 directories: bucket and 31 below)
MAX_READABLE_BYTES = 1024  # of the key in a readable path: S3's own limit, far below PATH_MAX
_UNSAFE_CHARS = re.compile(f"[\x00-\x1f{INVISIBLE}\\\\]")  # controls, C1, bidi, zero-width: hashed
_BASENAME_KEEP = re.compile(r"[^A-Za-z0-9._+=@,-]")


def _segment_is_safe(seg: str) -> bool:
    if seg in ("", ".", ".."):
        return False
    if _UNSAFE_CHARS.search(seg):
        return False
    return len(seg.encode("utf-8")) <= MAX_SEGMENT_BYTES


def readable_path(ref: ObjectRef) -> str | None:
    """``<bucket>/<key>`` when every key segment is a safe file name and the key is neither deeper than
    MAX_DEPTH segments nor longer than MAX_READABLE_BYTES, else None."""
    segments = ref.key.split("/")
    if len(segments) > MAX_DEPTH or len(ref.key.encode("utf-8")) > MAX_READABLE_BYTES:
        return None
    if all(_segment_is_safe(s) for s in segments):
        return ref.bucket + "/" + ref.key
    return None


def object_digest(ref: ObjectRef) -> str:
    h = hashlib.sha256(ref.bucket.encode() + b"\x00" + ref.key.encode("utf-8"))
    return h.hexdigest()[:32]


def _safe_basename(key: str) -> str:
    base = key.rstrip("/").rsplit("/", 1)[-1]
    base = _BASENAME_KEEP.sub("_", base).lstrip(".") or "object"
    if len(base) > 100:  # keep the extension, which is what readers and tools key on
        stem, dot, ext = base.rpartition(".")
        ext = ext[:20] if dot else ""
        base = (stem if dot else base)[: 99 - len(ext)] + ("." + ext if ext else "")
    return base


def hashed_path(ref: ObjectRef) -> str:
    """``.h/<hh>/<hash>/<basename>``: safe for every key; the basename keeps the extension."""
    digest = object_digest(ref)
    return f"{HASHED_DIR}/{digest[:2]}/{digest}/{_safe_basename(ref.key)}"


def candidates(ref: ObjectRef) -> tuple[str, ...]:
    """Relative paths the object may occupy, in the order a reader should look."""
    readable = readable_path(ref)
    hashed = hashed_path(ref)
    return (readable, hashed) if readable else (hashed,)


def is_within(root: str, path: str) -> bool:
    """True when ``path`` (already joined onto root) stays inside ``root`` after resolving ``..``."""
    root_real = os.path.realpath(root)
    target = os.path.realpath(path)
    return target == root_real or target.startswith(root_real + os.sep)
