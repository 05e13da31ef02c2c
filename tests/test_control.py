"""control.py's server with real unix sockets and a handler of the test's own (the daemon end to end is in
test_hostile_sockets.py): sends never block, a client that stops reading loses only its own connection,
slow handlers stall nobody else, usage records are bounded and counted, a crashing I/O loop is loud."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from s3cache.errors import RequestRefused
from s3cache.reader.client import Client, UseNotes
from s3cache.reader.wire import MAX_LINE, MAX_RECORD, MAX_URIS
from s3cache.sockets.control import Connection, Server
from s3cache.sockets.usage_socket import MAX_PENDING_NOTES, holder_of, lease_name
from s3cache.testing import wait_for


class Harness:
    """A Server on a temp dir whose handler answers hello, blocks on ``slow``, and pushes ``n`` events
    on ``flood`` while holding ``state_lock`` (as the daemon pushes under its lock)."""

    def __init__(self, tmp_path, **kw) -> None:
        self.ctl = str(tmp_path / "ctl.sock")
        self.use = str(tmp_path / "use.sock")
        self.state_lock = threading.Lock()
        self.release = threading.Event()
        self.flood_sent: list[int] = []
        self.closed: list[Connection] = []
        self.server = Server(self.ctl, self.use, self.handle, self.closed.append, **kw)

    def handle(self, conn: Connection, msg: dict) -> dict | None:
        if msg["op"] == "slow":
            self.release.wait(60)
            return {"ok": "slow"}
        if msg["op"] == "flood":
            sent = 0
            with self.state_lock:
                for i in range(msg["n"]):
                    if not conn.send({"event": "ready", "uri": f"s3://b/{i:08d}" + "x" * 500}):
                        break
                    sent += 1
            self.flood_sent.append(sent)
            return None
        return {"ok": True, "op": msg["op"]}

    def client(self) -> Client:
        return Client(self.ctl, "test-cache", timeout=60)

    def __enter__(self) -> Harness:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.stop()


def test_a_client_that_stops_reading_is_dropped_and_sends_never_block(tmp_path):
    with Harness(tmp_path, max_outbound=256 << 10) as h:
        stuck = socket.socket(socket.AF_UNIX)
        stuck.connect(h.ctl)
        stuck.sendall(b'{"op":"flood","n":100000}\n')  # ~50 MB of events; it never reads one
        # The handler pushes under "the daemon's lock": it must come back, with the client dropped.
        wait_for(lambda: h.flood_sent, 60, "the flooding handler to return")
        assert h.flood_sent[0] < 100000
        assert h.server.counters()["dropped_slow"] == 1
        wait_for(lambda: len(h.closed) == 1, 60, "on_close for the dropped client")
        with h.state_lock:  # the lock is free again, and other clients are served
            pass
        with h.client() as c:
            assert c.request({"op": "hello"})["ok"]
        stuck.close()


def test_a_slow_request_stalls_neither_other_clients_nor_the_io_thread(tmp_path):
    with Harness(tmp_path) as h:
        slow = h.client()
        slow.sock.sendall(b'{"op":"slow"}\n')
        wait_for(lambda: h.server.counters()["connections"] == 1, 30, "the slow request to be accepted")
        for _ in range(3):
            with h.client() as c:
                assert c.request({"op": "status"}) == {"ok": True, "op": "status"}
        h.release.set()
        assert slow.receive() == {"ok": "slow"}
        slow.close()


def test_requests_of_one_connection_are_answered_in_order(tmp_path):
    with Harness(tmp_path) as h, h.client() as c:
        c.sock.sendall(b"".join(b'{"op":"op%d"}\n' % i for i in range(50)))
        assert [c.receive()["op"] for _ in range(50)] == [f"op{i}" for i in range(50)]


@pytest.mark.parametrize("line, code", [
    (b"[" * 100_000 + b"\n", "BadRequest"),  # RecursionError in json.loads
    (b'{"op": "\xff\xfe"}\n', "BadRequest"),
    (b"[1, 2, 3]\n", "BadRequest"),
    (b'{"op": "want", "uris": "s3://b/k"}\n', "BadRequest"),
    (b'{"op": "want", "uris": [%s]}\n' % b",".join([b'"s3://b/k"'] * (MAX_URIS + 1)), "TooMany"),
    (b'{"op": "x", "n": ' + b"9" * 5000 + b"}\n", "BadRequest"),
])
def test_malformed_requests_get_a_typed_error_and_the_connection_serves_on(tmp_path, line, code):
    with Harness(tmp_path) as h, h.client() as c:
        c.sock.sendall(line)
        with pytest.raises(RequestRefused) as e:
            c.receive()
        assert e.value.code == code
        assert c.request({"op": "hello"})["ok"]
        assert h.server.counters()["bad_requests"] == 1


def test_an_overlong_line_is_refused_and_closes_that_connection_only(tmp_path):
    with Harness(tmp_path) as h, h.client() as c, h.client() as other:
        c.sock.sendall(b'{"op": "' + b"a" * (MAX_LINE + 10))  # no newline, over the limit
        with pytest.raises(RequestRefused) as e:
            c.receive()
        assert e.value.code == "TooLarge"
        assert c.sock.recv(10) == b""  # closed
        assert other.request({"op": "hello"})["ok"]


def test_usage_records_malformed_or_oversized_are_counted_and_the_rest_kept(tmp_path):
    with Harness(tmp_path) as h:
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(h.use)
        bad.sendall(b"Rjob\0\xffgarbage\0x unknown kind\0h\xc3\x28\0hs3://b/ok\0w")  # last one unterminated
        bad.close()
        big = socket.socket(socket.AF_UNIX)
        big.connect(h.use)
        big.sendall(b"Rbig\0h" + b"a" * (MAX_RECORD + 1) + b"\0hs3://b/after\0")
        wait_for(lambda: h.server.counters()["oversized_notes"] == 1, 30, "the oversized record")
        big.close()
        notes = UseNotes(h.use, "good")
        notes.send("h", ["s3://b/good"])
        got: list = []
        # notes name the claimed reader and the holder the kernel says sent them: "good/<uid>:<pid>|<thread>"
        mine = lease_name(f"good/{threading.get_ident()}", holder_of(os.getpid(), os.getuid()))
        wait_for(lambda: got.extend(h.server.use.drain()) or (mine, "h", "s3://b/good") in got, 30,
                 "the good reader's note")
        notes.close()
        assert (f"job/{holder_of(os.getpid(), os.getuid())}", "h", "s3://b/ok") in got
        assert not any(u == "s3://b/after" for _, _, u in got)  # after the oversized record: connection closed
        st = h.server.counters()
        assert st["malformed_notes"] == 4  # \xff kind, unknown kind x, invalid UTF-8, cut off at close
        assert st["oversized_notes"] == 1


def test_drain_returns_notes_on_connections_not_yet_accepted(tmp_path):
    """Eviction drains under the lease lock: a note on a brand-new connection still in the listen backlog
    must be in what drain returns, whatever the I/O thread has or has not done yet."""
    h = Harness(tmp_path)  # not started: no I/O thread at all, only drain
    try:
        senders = [UseNotes(h.use, f"r{i}") for i in range(20)]
        for i, s in enumerate(senders):
            s.send("h", [f"s3://b/{i}"])
        got = h.server.use.drain()
        assert sorted(u for _, _, u in got) == sorted(f"s3://b/{i}" for i in range(20))
        for s in senders:
            s.close()
    finally:
        h.server.stop()


def test_drain_sees_every_note_even_out_of_descriptors(tmp_path):
    import resource

    h = Harness(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog: list[int] = []
    try:
        senders = [UseNotes(h.use, f"r{i}") for i in range(5)]
        for i, s in enumerate(senders):
            s.send("h", [f"s3://b/{i}"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        got = h.server.use.drain()  # accept() says EMFILE: the spare descriptor takes them one by one
        assert sorted(u for _, _, u in got) == sorted(f"s3://b/{i}" for i in range(5))
        assert h.server.counters()["accept_errors"] >= 5
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in senders:
            s.close()
        h.server.stop()


def test_notes_wake_a_waiting_drainer_and_the_select_fd(tmp_path):
    import select

    with Harness(tmp_path) as h:
        notes = UseNotes(h.use, "r")
        notes.send("w", ["s3://b/k"])
        assert h.server.use.wait(60)
        r, _, _ = select.select(h.server.use.fds(), [], [], 60)
        assert r
        me = lease_name(f"r/{threading.get_ident()}", holder_of(os.getpid(), os.getuid()))
        assert h.server.use.drain() == [(me, "w", "s3://b/k")]
        r, _, _ = select.select(h.server.use.fds(), [], [], 0)
        assert not r  # drained: nothing signalled any more
        notes.close()


def test_an_io_loop_that_keeps_crashing_is_loud(tmp_path, caplog):
    crashed: list[BaseException] = []
    h = Harness(tmp_path, on_crash=crashed.append)
    with h:
        os.close(h.server._sel.fileno())  # the epoll descriptor vanishes: every select() now fails
        wait_for(lambda: crashed, 60, "on_crash")
        assert h.server.failed.is_set()
        assert h.server.counters()["crashes"] >= 10
        os.dup2(os.open(os.devnull, os.O_RDONLY), h.server._sel.fileno())  # so that stop() closes something
    assert "I/O loop failed" in caplog.text


def test_a_null_list_is_taken_as_absent():
    """Found by the fuzz test: ``"uris": null`` reached the daemon's handlers as None (a TypeError in
    want and verify). The wire layer drops it, so handlers see their default."""
    from s3cache.reader.wire import parse_request

    assert parse_request(b'{"op":"want","uris":null,"ahead":null}') == {"op": "want"}


def test_a_usage_note_waits_for_room_in_a_full_backlog_instead_of_being_dropped(tmp_path, monkeypatch):
    """AF_UNIX answers EAGAIN to a connect when the listen backlog is full; taking that for "no daemon"
    dropped the note, and with it the lease on a file the reader is about to open (found by a second
    reading of the lease race, issue 11)."""
    import socket

    path = str(tmp_path / "use.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fillers = []
    while True:  # fill the backlog: connects that nobody accepts
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    from s3cache.reader import client

    monkeypatch.setattr(client, "BACKLOG_WAIT", 120.0)  # room comes below, however loaded the machine
    notes = UseNotes(path, "r")
    sender = threading.Thread(target=notes.send, args=("h", ["s3://b/leased"]))
    sender.start()
    sender.join(0.5)
    assert sender.is_alive()  # still trying: not given up as "no daemon"
    got = b""
    listener.settimeout(30)
    while b"s3://b/leased" not in got:  # the daemon's I/O thread empties the backlog
        conn, _ = listener.accept()
        conn.settimeout(0.2)
        try:
            got += conn.recv(4096)
        except socket.timeout:
            pass
        conn.close()
    sender.join(30)
    assert not sender.is_alive()
    notes.close()
    for s in fillers:
        s.close()
    listener.close()


def test_no_note_is_lost_by_a_reader_the_daemon_reads_and_closes(tmp_path):
    """Past ``max_use_connections`` a reader's connection is read and closed, and it reconnects for its next
    note. A note it sent after that last read but before the close went into a socket nobody would read
    again: its send had succeeded, so it never sent it again, and a lease was lost. Every note must arrive."""
    per_thread, threads = 400, 6
    with Harness(tmp_path, max_use_connections=1) as h:
        holder = socket.socket(socket.AF_UNIX)  # takes the one connection: every reader is read and closed
        holder.connect(h.use)
        wait_for(lambda: h.server.counters()["use_connections"] == 1, 30, "the first connection")

        def reader(i: int) -> None:
            notes = UseNotes(h.use, f"r{i}")
            for k in range(per_thread):
                notes.send("h", [f"s3://b/{i}/{k}"])
            notes.close()

        workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        got: set[str] = set()
        want = {f"s3://b/{i}/{k}" for i in range(threads) for k in range(per_thread)}

        def arrived() -> bool:
            got.update(u for _, _, u in h.server.use.drain())
            return not any(t.is_alive() for t in workers) and want <= got

        try:
            wait_for(arrived, 60, "every note")
        finally:
            for t in workers:
                t.join(60)
            holder.close()
        assert h.server.counters()["refused_readers"] >= threads  # each reader, at least once


def test_a_drain_reads_at_most_the_pending_cap_and_loses_nothing(tmp_path):
    """A flood on use.sock: drain runs under the daemon's state lock, so it reads no more than
    MAX_PENDING_NOTES (the rest waits in the kernel, in order) and the next drains get the rest."""
    h = Harness(tmp_path)  # no I/O thread: drain alone reads
    flooders: list[socket.socket] = []
    try:
        sent = 0
        record = b"hs3://b/x\0"
        chunk = record * 4096
        while sent < 2 * MAX_PENDING_NOTES:
            s = socket.socket(socket.AF_UNIX)
            s.connect(h.use)
            s.sendall(b"Rflood\0")
            s.setblocking(False)
            try:
                while True:  # fill this connection's buffers: what a writer that never stops leaves
                    n = s.send(chunk)
                    sent += n // len(record)
                    if n % len(record):
                        s.setblocking(True)
                        s.sendall(chunk[n:][: len(record) - n % len(record)])  # end the record
                        sent += 1
                        break
            except BlockingIOError:
                pass
            flooders.append(s)
        first = h.server.use.drain()
        assert 0 < len(first) <= MAX_PENDING_NOTES + 1  # + the one a carried-over partial record completes
        got = len(first)
        for _ in range(100):
            if got >= sent:
                break
            batch = h.server.use.drain()
            assert len(batch) <= MAX_PENDING_NOTES + 1
            got += len(batch)
        assert got == sent  # nothing lost: what a drain left was read by the next ones
    finally:
        for s in flooders:
            s.close()
        h.server.stop()


def test_a_lease_holder_is_the_process_whatever_reader_id_it_claims(tmp_path):
    """Made-up reader ids on use.sock name positions only: every note carries the sender's uid:pid from
    the kernel, so one process is one lease holder."""
    with Harness(tmp_path) as h:
        for i in range(16):
            s = socket.socket(socket.AF_UNIX)
            s.connect(h.use)
            s.sendall(f"Rmade-up-{i}/thread-{i}\0hs3://b/{i}\0".encode())
            s.close()
        got: list = []
        wait_for(lambda: got.extend(h.server.use.drain()) or len(got) >= 16, 30, "the sixteen notes")
        me = holder_of(os.getpid(), os.getuid())
        assert sorted(r for r, _, _ in got) == sorted(f"made-up-{i}/{me}|thread-{i}" for i in range(16))


def test_a_connection_silent_after_connecting_is_closed_and_one_that_asked_is_kept(tmp_path):
    with Harness(tmp_path, idle_timeout=1.0) as h:
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(h.ctl)
        silent.settimeout(60)
        with h.client() as asked:
            assert asked.request({"op": "hello"})["ok"]
            assert silent.recv(10) == b""  # closed by the daemon (within the 60 s deadline)
            assert h.server.counters()["closed_idle"] == 1
            assert asked.request({"op": "hello"})["ok"]  # it asked once: kept however long it waits
        silent.close()


def test_an_unreachable_daemon_says_why_apart_from_the_command_it_suggests(tmp_path):
    from s3cache.errors import DaemonNotRunning

    path = str(tmp_path / "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fillers = []
    try:
        while True:  # fill the backlog: connects that nobody accepts
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(DaemonNotRunning) as e:
            Client(path, "/data/cache", timeout=5)
        msg = str(e.value)
        assert msg.startswith("cannot reach the s3cache daemon of /data/cache: its control socket's backlog is full")
        assert "`s3cache serve --cache-dir /data/cache --manifest MANIFEST`" in msg  # the command is whole
    finally:
        for s in fillers:
            s.close()
        listener.close()
