"""Pins: objects kept resident whatever the eviction policy says, for ``Space`` (space.py), which takes
this in as a mixin.

An object is pinned by ``s3cache pin`` (kept in the index's meta ``pins``, so durable across restarts)
or by the manifest's ``pin=1`` (changed only by editing the manifest). Eviction never takes a pinned
file (``Resident.pinned``, set from ``is_pinned``).

Invariants it keeps:

* ``pin`` changes nothing and raises PinQuotaExceeded when the pinned bytes (sizes known so far: cached
  files, the manifest's sizes, sizes learned from S3) would pass ``pin_quota`` of --max-size;
* ``s3cache pin``'s set is written to the index after every ``pin``/``unpin``; a manifest pin is never
  added to or removed from it;
* each pinned URI counts once, pinned both ways or not (``_pinned_uris``).

Uses the attributes ``Space`` sets (``s``, ``catalog``, ``ready``, ``known_sizes``, ``pinned``,
``index``); callers hold the state lock, as for every ``Space`` method. Imports no daemon part.
"""

from __future__ import annotations

from s3cache.errors import PinQuotaExceeded
from s3cache.service.config import human_size


class Pins:
    """Pin state and queries for ``Space`` (a mixin: see the module doc)."""

    def is_pinned(self, uri: str) -> bool:
        return uri in self.pinned or self._pinned_by_manifest(uri)

    def _pinned_by_manifest(self, uri: str) -> bool:
        pos = self.catalog.position(uri)
        return pos is not None and pos in self.catalog.pinned

    def _pinned_uris(self) -> set[str]:
        """Every pinned URI once: ``s3cache pin``'s and the manifest's ``pin=1``."""
        return self.pinned | {self.catalog.entry(p).uri for p in self.catalog.pinned}

    def _size_of(self, uri: str) -> int:
        """Bytes ``uri`` takes or will take, as far as known now (0 if unknown)."""
        rec = self.ready.get(uri)
        if rec is not None:
            return rec.size
        pos = self.catalog.position(uri)
        size = self.catalog.entry(pos).size if pos is not None else None
        return size if size is not None else self.known_sizes.get(uri, 0)

    def pinned_bytes(self, ready_only: bool = False) -> int:
        """Bytes of pinned objects: cached ones, and with ``ready_only`` False those still to come too."""
        return sum(self.ready[u].size if u in self.ready else 0 if ready_only else self._size_of(u)
                   for u in self._pinned_uris())

    def pin_count(self) -> int:
        return len(self._pinned_uris())

    def pin_quota(self) -> int:
        return int(self.s.max_size * self.s.pin_quota)

    def max_fit(self, uri: str) -> int:
        """The largest object that can ever be cached for ``uri`` while the pins stay: --max-size less the
        cached pinned files (other than ``uri`` itself)."""
        held = sum(self.ready[u].size for u in self._pinned_uris() if u in self.ready and u != uri)
        return self.s.max_size - held

    def pin(self, uris: list[str], pin: bool) -> list[dict]:
        """``s3cache pin/unpin``: keep files resident or release them; durable. Returns per URI its
        ``outcome``: pinned / already_pinned / manifest (pin), unpinned / not_pinned / manifest (unpin).
        A manifest's ``pin=1`` is not changed here (edit the manifest). Raises PinQuotaExceeded, changing
        nothing, when the pinned bytes (sizes known so far) would pass ``pin_quota`` of --max-size."""
        if pin:
            new = [u for u in dict.fromkeys(uris) if u not in self.pinned and not self._pinned_by_manifest(u)]
            adding = sum(self._size_of(u) for u in new)
            have, quota = self.pinned_bytes(), self.pin_quota()
            if adding and have + adding > quota:
                raise PinQuotaExceeded(
                    f"pinning {len(new)} more object(s) ({human_size(adding)}) would pin "
                    f"{human_size(have + adding)}, over the pin quota of {human_size(quota)} "
                    f"(pin_quota {self.s.pin_quota:g} of --max-size {human_size(self.s.max_size)}): "
                    f"unpin others or raise --pin-quota")
        results = []
        for uri in uris:
            by_manifest = self._pinned_by_manifest(uri)
            if pin:
                outcome = "manifest" if by_manifest else "already_pinned" if uri in self.pinned else "pinned"
                if not by_manifest:
                    self.pinned.add(uri)
            else:
                outcome = "manifest" if by_manifest else "unpinned" if uri in self.pinned else "not_pinned"
                self.pinned.discard(uri)
            results.append({"uri": uri, "outcome": outcome})
        self.index.set_meta("pins", sorted(self.pinned))
        return results
