"""Why a download found no room, for ``Space`` (space.py), which takes this in as a mixin: what each
refused admission needed, what holds the cache's bytes that eviction may not take (leased, pinned,
being read, unread prefetch, needed sooner, in flight), and the space's piece of ``status`` (with the
leases' and the waits').

Invariants it keeps:

* it reports and never decides: admission and eviction stay in eviction.py; the only state it changes is
  ``waits`` and ``min_free_reached`` (never the resident set, reservations or leases);
* at most ``4 * MAX_WAITS_SHOWN`` refusals are remembered (the oldest dropped first) and at most
  ``MAX_WAITS_SHOWN`` shown, readers' waits first; a refusal older than 5 s is not shown;
* a reader's wait is logged once (when first refused), not at every retry;
* a wait's ``since`` is kept across retries, so status shows how long it has lasted.

Uses the attributes ``Space`` sets (``s``, ``waits``, ``leases``, ``ready``, ``used``, ``reserved``,
``store``, ``disk_full``, ``min_free_reached``, ``evicted``, ``evicted_bytes``, ``_tracker``) and its
``residents``, ``is_pinned``, ``pin_count`` and ``pin_quota``; callers hold the state lock. Imports no
daemon part.
"""

from __future__ import annotations

import logging
import time

from s3cache.policy.evict import Future
from s3cache.service.config import human_size

log = logging.getLogger("s3cache.daemon")

MAX_WAITS_SHOWN = 10


class RoomReports:
    """Refused admissions and what holds the room, for ``Space`` (a mixin: see the module doc)."""

    def _refused(self, uri: str, size: int, need: int, demand: bool, disk_short: bool, fut: Future,
                 target: int | None, now: float) -> None:
        """Remember (for status) and log once why ``uri`` found no room."""
        if not demand and disk_short and self.s.min_free:
            if not self.min_free_reached:
                log.info("free space below --min-free %.0f%%: prefetch paused", self.s.min_free * 100)
            self.min_free_reached = True
        first = uri not in self.waits
        why = self._explain(fut, target)
        self.waits[uri] = {"uri": uri, "reader_waits": demand, "size": size, "need": need,
                           "limit": "filesystem" if disk_short else "max_size",
                           "since": self.waits.get(uri, {}).get("since", now), "at": now, "held": why}
        if len(self.waits) > 4 * MAX_WAITS_SHOWN:
            for old in sorted(self.waits, key=lambda u: self.waits[u]["at"])[:MAX_WAITS_SHOWN]:
                del self.waits[old]
        if first and demand:
            parts = ", ".join(f"{k.replace('_', ' ')} {human_size(v)}" for k, v in why.items() if v)
            log.warning("a reader waits for room for %s (%s, %s short on the %s): %s", uri, human_size(size),
                        human_size(need), "filesystem" if disk_short else "--max-size", parts or "nothing cached")

    def _explain(self, fut: Future, target: int | None) -> dict[str, int]:
        """What holds the cache's bytes that eviction may not take, by reason (state lock held)."""
        held = self.leases.held(time.monotonic())
        current = self._tracker.current()
        out = {"leased": 0, "pinned": 0, "being_read": 0, "unread_prefetch": 0, "needed_sooner": 0,
               "in_flight": self.reserved}
        for r in self.residents():
            if r.pinned:
                out["pinned"] += r.size
            elif r.position is not None and r.position in current:
                out["being_read"] += r.size
            elif r.uri in held:
                out["leased"] += r.size
            elif r.last_used <= 0:
                out["unread_prefetch"] += r.size
            elif fut and r.position is not None and target is not None:
                d = fut.distance(r.position)
                if d is not None and d <= target:
                    out["needed_sooner"] += r.size
        return out

    def status(self) -> dict:
        """This part's piece of ``status`` (state lock held by the caller)."""
        now = time.time()
        pinned = [r for u, r in self.ready.items() if self.is_pinned(u)]
        methods: dict[str, int] = {}
        for r in self.ready.values():
            methods[r.method] = methods.get(r.method, 0) + 1
        return {
            "ready": len(self.ready),
            "bytes": {"ready": self.used, "reserved": self.reserved, "max": self.s.max_size,
                      "free_fraction": round(self.store.free_fraction(), 4)},
            "verified_by": methods,
            "disk_full": self.disk_full,
            "pinned": {"files": len(pinned), "bytes": sum(r.size for r in pinned), "objects": self.pin_count(),
                       "quota_bytes": self.pin_quota()},
            "evicted": self.evicted,
            "evicted_bytes": self.evicted_bytes,
            "leases": self.lease_status(),
            "min_free_reached": self.min_free_reached,
            "waiting_for_space": self.waiting(now),
        }

    def lease_status(self) -> dict:
        """What readers' leases hold now: files, bytes, how many readers hold them, the byte budget."""
        now = time.monotonic()
        held = self.leases.held(now)
        sizes = [self.ready[u].size for u in held if u in self.ready]
        return {"files": len(sizes), "bytes": sum(sizes), "readers": self.leases.holders(now),
                "budget": self.leases.budget}

    def waiting(self, now: float) -> list[dict]:
        """Admissions refused within the last few seconds (a waiting reader's is retried every second),
        readers' first: what each needs and what holds the room."""
        # A ready URI may wait too: a refetch of a file S3 changed (its old copy stays until the new one
        # lands; ``commit`` drops the wait)
        recent = [w for w in self.waits.values() if now - w["at"] < 5.0]
        recent.sort(key=lambda w: (not w["reader_waits"], w["since"]))
        return [{"uri": w["uri"], "reader_waits": w["reader_waits"], "size": w["size"], "need": w["need"],
                 "limit": w["limit"], "seconds": round(now - w["since"], 1), "held": w["held"]}
                for w in recent[:MAX_WAITS_SHOWN]]
