"""Whether a reader may trust a cache dir: the checks ``resolve()`` makes before it hands out any path
under it, the readers' side of the daemon's own (store/trust.py). A reader trusts files by their owner,
so the dir must be one no one but that owner (or root) can plant a file or a symlink in.

Invariant: ``trusted_owner`` only reads (``stat``/``lstat``); it never creates or changes anything, so a
reader may call it on a cache dir the daemon has not made yet.
"""

from __future__ import annotations

import os
import stat

from s3cache.errors import UntrustedCacheDir
from s3cache.store.paths import PRIVATE_DIR


def trusted_owner(root: str) -> int | None:
    """The uid that owns the cache dir ``root``, if a reader may trust what is in it; None if it does not
    exist yet. Raises UntrustedCacheDir as the daemon refuses such a dir (store/trust.py): the dir or its
    ``.s3cache`` writable by others, ``.s3cache`` not a directory of the same owner, or an owner who is
    neither root, this reader, nor the owner of a parent only its owner may write (in a shared parent
    such as /tmp anyone can create the dir first). Then no one else can plant a file or a symlink in
    it, and a path under it never leads out of it."""
    try:
        st = os.stat(root)
        priv = os.lstat(os.path.join(root, PRIVATE_DIR))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UntrustedCacheDir(f"cache dir {root} cannot be checked: {e.strerror}") from None
    why = None
    if not stat.S_ISDIR(st.st_mode) or not stat.S_ISDIR(priv.st_mode) or priv.st_uid != st.st_uid:
        why = f"its {PRIVATE_DIR} is not a directory of the cache dir's owner"
    elif (st.st_mode | priv.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
        why = "it is writable by others than its owner"
    elif st.st_uid not in (0, os.geteuid()):
        parent = os.stat(os.path.dirname(os.path.realpath(root)))
        if parent.st_uid != st.st_uid and (parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            why = f"it is owned by uid {st.st_uid} in {os.path.dirname(root)}, where anyone may create it first"
    if why is not None:
        raise UntrustedCacheDir(f"cache dir {root} is not one a daemon would serve: {why}; not reading from it")
    return st.st_uid
