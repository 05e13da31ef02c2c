"""The daemon's teardown: every thread stopped, then everything closed, in an order that loses nothing.

``tear_down(d)`` runs once, on the thread that started the daemon: after ``wait`` saw it stopping, or
when start-up failed part way (startup.py). It copes with any prefix of start-up having run: a part that
was never built is ``None`` and skipped.

Order, and why:

1. ``d.stop()`` (idempotent): every loop is told; downloads are aborted, the manifest watch stops.
2. The manifest watch and the publisher end; the peer listener stops, as it is one of the supervised
   threads waited for next and serves until told.
3. Every thread of ``d._threads`` is waited for, for at most ``JOIN_FOR`` seconds in all, hanging up
   the fetcher's requests again meanwhile: a GET waiting for its answer holds its thread until S3
   answers, and a worker may have sent one after the first hang-up.
4. The control server stops (readers are told nothing more), the fetcher's connections close.
5. Usage is flushed to the index and temp files removed (an error here is logged: the cache dir may
   have vanished), then the index, the space's lease lock and the cache dir's lock are closed: last,
   because the threads above write through them until they end.

"stopped" is logged only by a daemon that served (one that never started has nothing to report).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .root import Daemon

log = logging.getLogger("s3cache.daemon")

JOIN_FOR = 10.0  # seconds teardown waits for the daemon's threads, in all


def tear_down(d: Daemon) -> None:
    """Stop ``d`` and close everything it opened (see the module doc for the order)."""
    d.stop()
    if d.manifests is not None:
        d.manifests.close()
    if d.publisher is not None:
        d.publisher.stop()
    if d.peering is not None:  # its listener is one of the threads waited for below
        d.peering.stop()
    # A GET waiting for its answer holds its thread until S3 answers (or its read timeout): hang up
    # again until every thread has ended, as one may have sent a request after the first hang-up.
    deadline = time.monotonic() + JOIN_FOR
    for t in d._threads:
        while t.is_alive() and time.monotonic() < deadline:
            if d.fetcher is not None:
                d.fetcher.abort()
            t.join(timeout=0.2)
    stuck = [t.name for t in d._threads if t.is_alive()]
    if stuck:  # a thread nothing told to stop: exiting without it, but never silently
        log.error("thread(s) %s did not stop within %.0f s of the stop; exiting without them",
                  ", ".join(stuck), JOIN_FOR)
    if d.server is not None:
        d.server.stop()
    if d.fetcher is not None:
        d.fetcher.close()
    try:
        if d.space is not None:
            d.space.flush()
        d.store.clean_tmp()
    except OSError as e:  # the cache dir may have vanished under us
        log.error("could not clean up %s: %s", d.store.layout.root, e.strerror)
    if d.index is not None:
        try:
            d.index.close()
        except Exception:  # noqa: BLE001,S110  closing is best effort: the index is durable per write
            pass
    if d.space is not None:
        d.space.close()
    d.store.close()
    if d.serving:  # a daemon that never started has nothing to report stopping
        log.info("stopped")
