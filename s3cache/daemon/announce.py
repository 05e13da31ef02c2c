"""Announced orders (issue 15) and why a file is not there (issue 19): the ``order``, ``order_list``
and ``explain`` requests, answered by ``Readers`` (readers.py), which takes this in as a mixin.

``order`` installs a reader's announced read order (``order.Announcement``) in the ReaderTracker, so
prefetch and eviction follow it; ``order_list`` receives a reader's list in chunks when the daemon does
not know it (the manifest or a share of it is known without one); ``explain`` says, per object a reader
gave up waiting for, what the daemon knows (ready, failed, fetching, waiting for space, queued, not
requested). The wire shape of ``order``/``order_list`` is order.py's module doc.

Invariants it keeps:

* work proportional to a list (its map, its permutation) is done outside the state lock, on the
  caller's handler thread; only installing the built announcement takes the lock;
* an announcement is installed only against the manifest it was built for: if the manifest changed
  meanwhile the reader is told to announce again (UnknownList), never given positions of another one;
* a malformed request is answered with BadRequest (``ListError``) and changes nothing;
* ``explain`` reads state under the state lock and changes none (at most 64 URIs per request).

Uses the attributes ``Readers`` sets: ``_cond`` (the daemon's state lock), ``_schedule``, ``_space`` and
``tracker``; it imports no daemon part.
"""

from __future__ import annotations

import logging
import time

from s3cache.errors import S3CacheError
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.refs import decode_key, from_identity
from s3cache.policy.evict import leased
from s3cache.policy.order import M64, Announcement, ListError, Lists
from s3cache.service.config import human_size

log = logging.getLogger("s3cache.daemon")

MAX_READERS = 1_024  # readers tracked (notes and orders alike); a new one beyond makes the longest silent one forgotten
MAX_URI_CHARS = 5 + 63 + 1 + 1024  # s3:// + the longest bucket + / + the longest key S3 allows


class Announced:
    """``order``, ``order_list`` and ``explain`` for ``Readers`` (a mixin: see the module doc)."""

    # ``order``/``order_list`` wire shape: order.py's module doc. Work proportional to the list (its
    # map, its permutation) is done outside the state lock, on the caller's handler thread.

    _lists: Lists | None = None  # made on first use (under the state lock)

    def order_op(self, op: str, msg: dict, throughput: float = 0.0) -> dict:
        """Answer ``order``, ``order_list`` or ``explain`` (``throughput``: bytes/s the daemon receives)."""
        try:
            if op == "order":
                return self.order(msg)
            if op == "order_list":
                return self.order_list(msg)
            uris = msg.get("uris")
            return {"results": self.explain([str(u) for u in uris] if isinstance(uris, list) else [], throughput)}
        except ListError as e:
            return {"error": str(e), "code": "BadRequest"}

    def _order_lists(self) -> Lists:
        with self._cond:
            if self._lists is None:
                self._lists = Lists()
            return self._lists

    def order(self, msg: dict) -> dict:
        """A reader announces the order it will read its list in (``order.Announcement``)."""
        reader = str(msg.get("reader", ""))
        seed, epoch, n, start = (_whole(msg, k) for k in ("seed", "epoch", "n", "start"))
        digest = str(msg.get("list", ""))
        share = msg.get("share")
        if share is not None:
            if not (isinstance(share, list) and len(share) == 2 and all(type(x) is int for x in share)):
                raise ListError(f"share must be [index, count], not {share!r}")
            share = (share[0], share[1])
        if not 0 <= start <= n:
            raise ListError(f"start {start} is not in 0..{n}")
        with self._cond:
            catalog = self._schedule.catalog
        lm = self._order_lists().map_for(digest, n, share, token=catalog, manifest_n=len(catalog),
                                         manifest_uris=lambda: _identities(catalog),
                                         position_of=catalog.position)
        if lm is None:
            return {"error": f"list {digest} is neither the manifest nor a share of it: send it with order_list",
                    "code": "UnknownList"}
        ann = Announcement(seed & M64, epoch & M64, lm, cursor=start)
        ann._this(), ann._next()  # build both epochs' orders here, not under the lock
        with self._cond:
            if self._schedule.catalog is not catalog:
                return {"error": "the manifest changed meanwhile: announce again", "code": "UnknownList"}
            if reader not in self.tracker.ids():
                self.tracker.make_room(MAX_READERS - 1)  # announced ids are made up as freely as noted ones
            self.tracker.announce(reader, ann)
            log.info("reader %s announced epoch %d: %d files in its seed-%d order from #%d", reader, epoch, n,
                     seed, start)
        self._schedule.reconsider()
        with self._cond:
            self._schedule.work_changed()
        return {"ok": True}

    def order_list(self, msg: dict) -> dict:
        """A chunk of a reader's list, after the daemon answered its ``order`` with UnknownList."""
        uris = msg.get("uris")
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise ListError("uris must be a list of strings")
        for i, u in enumerate(uris):  # kept for the list's life: only what could be an object's identity
            if not u.startswith("s3://") or len(u) > MAX_URI_CHARS or "\0" in u:
                raise ListError(f"uris[{i}] is not an s3:// URI of at most {MAX_URI_CHARS} characters: {u[:80]!r}")
        got = self._order_lists().upload(str(msg.get("list", "")), _whole(msg, "offset"), _whole(msg, "n"), uris)
        return {"ok": True, "received": got}

    def explain(self, uris: list[str], throughput: float = 0.0) -> list[dict]:
        """What the daemon knows about each object a reader gave up waiting for: ``state`` (ready,
        failed, fetching, waiting_for_space, queued, not_requested, invalid) and ``text`` saying it."""
        out: list[dict] = []
        with self._cond:
            sched, space = self._schedule, self._space
            demand = [e.uri for e in sched.demand]
            for raw in uris[:64]:
                try:
                    uri = from_identity(raw).uri
                except S3CacheError as e:
                    out.append({"uri": raw, "state": "invalid", "text": str(e)})
                    continue
                item: dict = {"uri": uri}
                # Refused room and holding none since: a worker handed it again (while a reader waits,
                # every second) is only asking for room again, not downloading it.
                for_room = uri in sched.blocked or (uri in space.waits and uri not in space.reservations)
                if space.is_ready(uri) and not space.ready[uri].superseded:  # superseded: its refetch says
                    item.update(state="ready", text="it is ready now (it landed just after the timeout)")
                elif (f := sched.failed.get(uri)) is not None:
                    code, message = f.code, f.message
                    retry = "" if f.permanent else f" (retried in {max(0.0, f.retry_at - time.monotonic()):.0f} s)" \
                        if f.retry_at is not None else ""
                    item.update(state="failed", code=code, text=f"failed with {code}: {message}{retry}")
                elif sched.is_fetching(uri) and not for_room:
                    item.update(state="fetching", fetching=len(sched.fetching), bytes_per_s=round(throughput),
                                text=f"fetching, one of {len(sched.fetching)} download(s) in flight, "
                                     f"{throughput / 1e6:.1f} MB/s in all")
                elif for_room or space.disk_full or sched.prefetch_paused:
                    item.update(state="waiting_for_space", **self._room(uri))
                    item["text"] = self._room_text(item)
                elif uri in demand:
                    ahead = demand.index(uri)
                    item.update(state="queued", behind=ahead, fetching=len(sched.fetching),
                                text=f"queued behind {ahead} other file(s), {len(sched.fetching)} download(s) "
                                     f"in flight at {throughput / 1e6:.1f} MB/s in all")
                else:
                    item.update(state="not_requested",
                                text="the daemon has no request for it (the reader's connection was lost?)")
                out.append(item)
        return out

    def _room(self, uri: str) -> dict:
        """Who holds the cache's bytes (state lock held): the space's record of why ``uri``'s last
        admission was refused (its limit, --max-size or the filesystem, what it was short, and what held
        the bytes eviction may not take, by reason), else what pins, leases and downloads hold now."""
        sp, now = self._space, time.time()
        lease = sp.s.lease
        held = pinned = 0
        for r in sp.residents():
            if r.pinned:
                pinned += r.size
            elif leased(r, now, lease):
                held += r.size
        refused = sp.waits.get(uri) or {}
        why = refused.get("held") or {"leased": held, "pinned": pinned, "in_flight": sp.reserved}
        return {"max": sp.s.max_size, "used": sp.used, "reserved": sp.reserved, "leased": held, "pinned": pinned,
                "disk_full": sp.disk_full, "readers": sp.leases.holders(time.monotonic()),
                "limit": refused.get("limit", "max_size"), "need": refused.get("need", 0), "held": why}

    @staticmethod
    def _room_text(r: dict) -> str:
        """Names what keeps the room: only the reasons that hold bytes (a reason at 0 is not a cause)."""
        if r["disk_full"]:
            return "waiting for space: the filesystem under the cache dir is full"
        held = r["held"]
        parts = [f"{human_size(held[k])} {what}" for k, what in (
            ("leased", f"leased by {r['readers']} reader(s)"), ("pinned", "pinned by the manifest"),
            ("being_read", "being read"), ("unread_prefetch", "prefetched and not read yet"),
            ("needed_sooner", "needed sooner by readers"), ("in_flight", "reserved by downloads in flight"))
            if held.get(k)]
        holders = ", ".join(parts) or "nothing the daemon may not evict (room frees as files are evicted)"
        if r["limit"] == "filesystem":
            return (f"waiting for space: the filesystem under the cache dir has too little free space "
                    f"({human_size(r['need'])} short, --min-free counted), not the cache's "
                    f"{human_size(r['max'])} limit; the cache holds {human_size(r['used'])}: {holders}")
        return (f"waiting for space: {human_size(r['used'] + r['reserved'])} of the {human_size(r['max'])} "
                f"cache in use; eviction may not take {holders}")


def _whole(msg: dict, name: str) -> int:
    v = msg.get(name, 0)
    if type(v) is not int or v < 0:
        raise ListError(f"{name} must be a whole number, not {v!r}")
    return v


def _identities(catalog: Catalog):
    """The manifest's URIs (identities) in order, from its canonical lines (no full parse per entry)."""
    for i in range(len(catalog)):
        uri = catalog.line(i).split(" ", 1)[0]
        if "%" in uri:  # the canonical line quotes a key only when it must (catalog.format_entry)
            bucket, _, key = uri[5:].partition("/")
            uri = f"s3://{bucket}/{decode_key(key)}"
        yield uri
