"""Where everything lives under a cache dir: the one table of its paths (``Layout``).

Pure: it creates nothing and checks nothing, so readers (``resolve``, the CLI) can name the sockets and
the lease lock without loading the daemon's store. Invariant: every private path is under
``<root>/.s3cache`` (``paths.PRIVATE_DIR``), and ``abspath`` only joins a relative path to the root
(the paths themselves are made safe by ``paths``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import cached_property

from . import paths

LEASE_LOCK = "lease.lock"

# The mode bit that marks a cached file whose object S3 now holds another version of (the index row's
# ``superseded``): a reader's fast path (``resolve``) already has the file's mode from the lstat it makes,
# so it skips a marked file at no cost and asks the daemon, which answers with the new version. The
# sticky bit has no meaning for a regular file on Linux, and it leaves every permission as it was: a
# reader that resolved the file before it was marked still opens it within its lease.
SUPERSEDED_BIT = stat.S_ISVTX


@dataclass(frozen=True)
class Layout:
    """Where everything lives under a cache dir. Pure: creating nothing, checking nothing."""

    root: str

    @cached_property  # per object (every temp file's path): joined once
    def private(self) -> str:
        return os.path.join(self.root, paths.PRIVATE_DIR)

    @cached_property
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
