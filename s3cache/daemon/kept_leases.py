"""Readers' leases kept across a restart of the daemon.

A lease is a promise to a reader process that was handed a path: the file stays for ``--lease``. That
process outlives a restart of the daemon (``systemctl restart``, a crash, the watchdog), so the promise
must too. The leases in force are saved in the index (one metadata row, written in one SQLite
transaction: all or nothing) at most once a second when they changed, and at stop; a start restores
them, each keeping what is left of its lease.

Lease times are ``time.monotonic``, which counts from the boot: they are restored only under the same
boot (``/proc/sys/kernel/random/boot_id``); after a reboot no reader that was promised anything is left.
A lease granted in the last second before a crash may be lost (the save is batched like usage times).
"""

from __future__ import annotations

import logging
import time

from s3cache.policy.leases import Leases
from s3cache.store.index import Index

log = logging.getLogger("s3cache.daemon")

META = "leases"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id ("" where the kernel does not tell: then nothing is restored)."""
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def restore(index: Index, leases: Leases) -> int:
    """Put the leases the last run saved back into ``leases``; how many."""
    saved = index.get_meta(META)
    boot = boot_id()
    if not isinstance(saved, dict) or not boot or saved.get("boot") != boot:
        return 0
    n = leases.restore(saved.get("rows"), time.monotonic())
    if n:
        log.info("kept %d lease(s) readers were given before the restart", n)
    return n


def save(index: Index, rows: list[list]) -> None:
    """Save ``Leases.snapshot`` rows (replacing the last save)."""
    index.set_meta(META, {"boot": boot_id(), "rows": rows})
