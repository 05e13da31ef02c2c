"""Where everything lives under a cache dir: the one table of its paths (``Layout``).

Pure: it creates nothing and checks nothing, so readers (``resolve``, the CLI) can name the sockets and
the lease lock without loading the daemon's store. Invariant: every private path is under
``<root>/.s3cache`` (``paths.PRIVATE_DIR``), and ``abspath`` only joins a relative path to the root
(the paths themselves are made safe by ``paths``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import paths

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
