"""Which host of the fleet owns an object, computed the same on every host with no coordinator.

``RendezvousOwners``: rendezvous (highest random weight) hashing over a host list, aggregated over
``SLOTS`` fixed slots: an object's URI hashes to a slot, and each slot belongs to the host with the
highest weight for it. The table is built once per host list, so a lookup is one hash and one index
(about a microsecond); a host leaving moves only the slots it owned, each to the host that ranked
second for it. The owner depends on the URI alone, so hosts agree whatever manifests (jobs) they run.

The ``--shard`` rule (position ``p`` to host ``p % N``) is not used for ownership: a daemon started with
``--shard`` keeps only its own share's positions, so it could not tell which host owns another share's
object. A sharded job still fetches each object from S3 once with peers: through its owner.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SLOTS = 4096  # fixed: every host must use the same number for the table to agree


def _weight(host: str, slot: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{slot}\0{host}".encode(), digest_size=8).digest(), "big")


def slot_of(uri: str, slots: int = SLOTS) -> int:
    """The slot an object's URI hashes to."""
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big") % slots


class RendezvousOwners:
    """The owner of each slot, by rendezvous hashing over ``hosts``. Invariant: ``table[s]`` is the host
    with the highest ``_weight(host, s)``; ties (never seen with 64-bit weights) go to the first host."""

    def __init__(self, hosts: Sequence[str], slots: int = SLOTS) -> None:
        if not hosts:
            raise ValueError("no hosts")
        self.hosts = tuple(hosts)
        self.slots = slots
        self.table = tuple(max(self.hosts, key=lambda h, s=s: _weight(h, s)) for s in range(slots))

    def owner(self, uri: str) -> str:
        """The host that owns ``uri``."""
        return self.table[slot_of(uri, self.slots)]
