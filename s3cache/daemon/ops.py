"""The control socket's operations: each request routed to the part that answers it, and who may pin.

Ops: ``want`` (readers), ``status`` (the daemon's assembled status), ``verify`` (maintenance), ``pin`` /
``unpin`` (the space and the schedule), ``hello``, and ``order`` / ``order_list`` / ``explain`` (readers).
Runs on the control server's handler threads (control.py), never its I/O thread.

Invariants: only the daemon's own user or root may pin or unpin, or ``verify --all`` / ``--source``
(SO_PEERCRED of the connection; an unknown peer is refused): pins hold space against every reader, and
those verifies send S3 requests with the daemon's credentials by the thousand; a refused or malformed
request changes nothing; an object S3 refuses (no such key, say: asked with one HEAD unless it is
cached) is not pinned and its result says why. Verification runs one request at a time on its own thread, never on the
handler pool, with at most ``MAX_VERIFY_QUEUED`` waiting (more are answered Busy): so however many
verifies are sent, wants and status always have a handler thread. Its answer is sent when it is done,
after any later request of the same connection. An unknown op gets an error reply, never an
exception; the parts' state is touched only under the state lock, inside the parts or here around a pin.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from s3cache.errors import FetchFailed, PermissionDenied, S3CacheError
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef, from_identity
from s3cache.sockets.control import E_BUSY, E_FAILED, PROTOCOL, Connection
from s3cache.sockets.usage_socket import holder_of, lease_name

MAX_VERIFY_QUEUED = 8  # verify requests waiting for the verifier thread; more are answered Busy

from .supervise import Supervisor

if TYPE_CHECKING:
    from .maintenance import Maintenance
    from .manifest_watch import ManifestWatch
    from .readers import Readers
    from .schedule import Schedule
    from .space import Space


def peer_uid(conn: Connection) -> int | None:
    """The uid of the process at the other end of a control connection (None if unknown). Uses the
    Connection's own attribute when the socket server provides one, else asks the kernel."""
    uid = getattr(conn, "peer_uid", None)
    if uid is not None:
        return uid
    try:
        creds = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", creds)[1]


class Ops:
    """Answers ctl.sock requests (``handle``, the control server's handler). ``status()``: the daemon's
    assembled status; ``rate()``: the current throughput, for ``explain``; ``watch()``: the manifest watch
    in force, or None."""

    def __init__(self, *, cond: threading.Condition, space: Space, schedule: Schedule, readers: Readers,
                 maintenance: Maintenance, watch: Callable[[], ManifestWatch | None], status: Callable[[], dict],
                 rate: Callable[[], float], head: Callable[[Entry], object] | None = None,
                 supervisor: Supervisor | None = None) -> None:
        self.supervisor = supervisor or Supervisor.standalone()  # runs the verifier (loop_errors "verify")
        self.cond = cond
        self.head = head  # HEADs an object, raising FetchFailed when S3 refuses it
        self.space = space
        self.schedule = schedule
        self.readers = readers
        self.maintenance = maintenance
        self.watch = watch
        self.status = status
        self.rate = rate
        self._verifies: queue.Queue = queue.Queue(MAX_VERIFY_QUEUED)
        self._verifier: threading.Thread | None = None
        self._verifier_lock = threading.Lock()

    def handle(self, conn: Connection, msg: dict) -> dict | None:
        op = msg.get("op")
        if op == "want":
            # The lease is the kernel's process, never the claimed id (usage_socket.holder_of).
            reader = lease_name(str(msg.get("reader", "")), holder_of(conn.pid, conn.uid))
            results = self.readers.want(conn, reader, [str(u) for u in msg.get("uris", [])],
                                        [str(u) for u in msg.get("ahead", [])])
            watch = self.watch()
            if watch is not None:  # fetched on demand: count those of other hosts' shares
                watch.demanded(r["uri"] for r in results if r["state"] == "pending")
            return {"results": results}
        if op == "status":
            return {"status": self.status()}
        if op == "verify":
            return self.verify(conn, [str(u) for u in msg.get("uris", [])], bool(msg.get("all")),
                               bool(msg.get("source")))
        if op in ("pin", "unpin"):
            return self.pin(conn, [str(u) for u in msg.get("uris", [])], op == "pin")
        if op == "hello":
            return {"ok": True, "pid": os.getpid(), "protocol": PROTOCOL}
        if op in ("order", "order_list", "explain"):
            return self.readers.order_op(op, msg, self.rate())
        return {"error": f"unknown op {op!r}"}

    def verify(self, conn: Connection, uris: list[str], everything: bool, source: bool) -> dict | None:
        """Queue a verify for the verifier thread (None: it answers on ``conn`` when done). Raises
        PermissionDenied for ``--all``/``--source`` from anyone but the daemon's user or root; answers
        Busy when MAX_VERIFY_QUEUED wait already."""
        if everything or source:
            uid = peer_uid(conn)
            if uid is None or uid not in (0, os.geteuid()):
                what = "--all" if everything else "--source"
                raise PermissionDenied(
                    f"uid {'unknown' if uid is None else uid} may not verify {what}: it needs the daemon's user "
                    f"(uid {os.geteuid()}) or root, as it re-reads the whole cache or asks S3 with the "
                    f"daemon's credentials; name the files to re-hash instead")
        try:
            self._verifies.put_nowait((conn, uris, everything, source))
        except queue.Full:
            return {"error": f"{MAX_VERIFY_QUEUED} verify requests are waiting already: try again later",
                    "code": E_BUSY}
        with self._verifier_lock:
            if self._verifier is None:
                self._verifier = self.supervisor.start("s3cache-verify", self._verify_loop)
        return None

    def _verify_loop(self) -> None:
        while True:
            conn, uris, everything, source = self._verifies.get()
            if conn.closed:
                continue  # nobody to tell: its client gave up
            try:
                reply = {"report": self.maintenance.verify(uris, everything, source)}
            except S3CacheError as e:
                reply = {"error": str(e), "code": type(e).__name__}
            except Exception as e:  # a bug: answer, then the supervisor counts it and verifies on
                conn.send({"error": f"{type(e).__name__}: {e}", "code": E_FAILED})
                raise
            conn.send(reply)

    def pin(self, conn: Connection, uris: list[str], pin: bool) -> dict:
        """``s3cache pin/unpin``: keep files resident (fetching them now) or release them.

        Only the daemon's own user or root may pin or unpin (SO_PEERCRED of the control connection):
        pins outlive the job that made them and take cache space from every other reader. Replies
        ``{"ok", "pinned": every pinned URI counted once, "results": [{"uri", "outcome"}]}`` (outcomes:
        see Space.pin); raises PermissionDenied, PinQuotaExceeded or UnsafeKey, changing nothing."""
        uid = peer_uid(conn)
        if uid is None or uid not in (0, os.geteuid()):
            raise PermissionDenied(
                f"uid {'unknown' if uid is None else uid} may not {'pin' if pin else 'unpin'}: pins need the daemon's user "
                f"(uid {os.geteuid()}) or root, as they hold cache space against every reader")
        refs = [from_identity(u) for u in uris]
        refused = self._refused(refs) if pin else {}
        with self.cond:
            results = self.space.pin([r.uri for r in refs if r.uri not in refused], pin)
            results += [{"uri": uri, "outcome": "refused", "code": e.code, "reason": e.reason}
                        for uri, e in refused.items()]
            order = {r.uri: i for i, r in reversed(list(enumerate(refs)))}
            results.sort(key=lambda res: order[res["uri"]])
            refs = [r for r in refs if r.uri not in refused]
            if pin:
                for ref in refs:
                    self.schedule.fetch_soon(ref)
            self.schedule.work_changed()
            return {"ok": True, "pinned": self.space.pin_count(), "results": results}

    def _refused(self, refs: list[ObjectRef]) -> dict[str, FetchFailed]:
        """The objects S3 refuses (NoSuchKey, AccessDenied, ...), by URI: one HEAD each for those not
        cached, outside the state lock. A pin used to say "pinned" for a key that does not exist and
        leave the failure to be found later in status."""
        if self.head is None:
            return {}
        with self.cond:
            ask = [self.schedule.entry_for(r.uri) or Entry(r) for r in dict.fromkeys(refs)
                   if not self.space.is_ready(r.uri)]
        refused: dict[str, FetchFailed] = {}
        for entry in ask:
            try:
                self.head(entry)
            except FetchFailed as e:
                refused[entry.uri] = e
        return refused
