"""Hostile neighbours, second round: a member of the daemon's group (a user made by the test) who sends
what an honest reader never would, against the real daemon. Each test shows the limit holds: a member
costs bounded memory and threads, holds a bounded share of the cache, and cannot run the daemon's
expensive requests. Skipped where users cannot be made (not root)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from s3cache import resolve
from s3cache.store.files import Layout

KiB = 1 << 10
MiB = 1 << 20
PY = "/usr/bin/python3"  # the member's side needs no s3cache: raw sockets, as an attacker would use


@pytest.fixture
def shared_cache(local_user):
    """(member, cache dir): a cache dir owned by root and a fresh group, under a sticky 1777 dir, and a
    new user in that group (the group the daemon's sockets and files are shared with)."""
    if not os.path.exists(PY):
        pytest.skip(f"needs {PY} to run a client as another user")
    g = "s3ctg" + uuid.uuid4().hex[:6]
    member = local_user(groups=(g,))
    shared = Path(tempfile.mkdtemp(prefix="s3ct-hostile-", dir="/tmp"))
    os.chmod(shared, 0o1777)
    cache = shared / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, 0, grp.getgrnam(g).gr_gid)
    yield member, cache
    shutil.rmtree(shared, ignore_errors=True)


def as_member(member, code: str, *args: str, timeout: float = 120) -> str:
    r = member.run([PY, "-c", code, *args], timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


# Notes under made-up reader ids, from ``procs`` processes at once: each process connects once per id
# and says it used its two files. The member prints "done" once every process sent all its notes.
SPOOF_NOTES = r"""
import os, socket, sys, json
sock, procs, files = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
per = len(files) // procs
kids = []
for p in range(procs):
    pid = os.fork()
    if pid == 0:
        mine = files[p * per:(p + 1) * per]
        for i in range(0, len(mine), 2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(f"Rinvented-{p}-{i}\0".encode() + b"".join(b"h" + u.encode() + b"\0" for u in mine[i:i + 2]))
            s.close()
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)
print("done")
"""


def test_made_up_reader_ids_hold_one_process_worth_and_a_uid_half_the_cache(
        shared_cache, s3, bucket, daemons):
    member, cache = shared_cache
    size, n = 256 * KiB, 32
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"f{i:02d}", Body=bytes([i]) * size)
    max_size = n * size  # every file fits: only leases decide what could be evicted
    d = daemons(cache, args=["--max-size", str(max_size), "--lease", "600"])
    uris = [f"s3://{bucket}/f{i:02d}" for i in range(n)]
    for u in uris:
        resolve(u, cache_dir=cache, timeout=120)
    use = Layout(str(cache)).use_socket
    # The daemon's own resolves are one process, ours: let their leases lapse out of the picture by
    # asking what is held beyond them.
    before = d.status()
    mine, hits = before["leases"]["files"], before["hits"]
    # One process, sixteen invented ids, two files each: one holder, its newest two files and its share.
    as_member(member, SPOOF_NOTES, use, "1", json.dumps(uris))
    st = d.wait_until(lambda st: st["hits"] >= hits + n, 60, "the member's notes to be applied")
    assert st["leases"]["readers"] <= 2, st["leases"]  # us and the member's one process
    assert st["leases"]["files"] - mine <= 3, st["leases"]  # its newest two, plus its budget share
    # Sixteen processes, two files each: the uid holds about half the cache, not all of it.
    as_member(member, SPOOF_NOTES, use, "16", json.dumps(uris))
    st = d.wait_until(lambda st: st["hits"] >= hits + 2 * n, 60, "the sixteen processes' notes to be applied")
    held = st["leases"]["bytes"] - mine * size
    assert held <= max_size // 2 + size, st["leases"]


# ``conns`` connections to ctl.sock, each sending ``wants`` wants of 1,000 objects nobody has; prints the
# count of each state in the answers, then exits (closing them all).
MISSING_WANTS = r"""
import json, socket, sys
sock, bucket, conns, wants = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
states, codes, socks = {}, {}, []
for c in range(conns):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    socks.append(s)
    f = s.makefile("rb")
    for w in range(wants):
        uris = [f"s3://{bucket}/nothing/{c}/{w}/{i}" for i in range(1000)]
        s.sendall(json.dumps({"op": "want", "reader": "m", "uris": uris}).encode() + b"\n")
        while True:
            msg = json.loads(f.readline())
            if "results" in msg:
                break
        for r in msg["results"]:
            states[r["state"]] = states.get(r["state"], 0) + 1
            if "code" in r:
                codes[r["code"]] = codes.get(r["code"], 0) + 1
print(json.dumps({"states": states, "codes": codes}))
"""


@pytest.fixture
def slow_s3(moto):
    """S3 through a proxy that answers each request after 5 s: demand stays queued while a test looks."""
    from s3cache.testing.faultproxy import FaultProxy

    p = FaultProxy(moto.port, latency=5.0).start()
    yield p
    p.stop()


def test_demand_outside_the_manifest_is_capped_per_connection_and_uid_and_dropped_when_they_leave(
        shared_cache, bucket, daemons, slow_s3):
    member, cache = shared_cache
    d = daemons(cache, args=["--endpoint-url", slow_s3.url, "--workers", "2"])
    ctl = Layout(str(cache)).control_socket
    # One connection, three wants of 1,000: the first 1,024 wait, the rest are refused at once.
    got = json.loads(as_member(member, MISSING_WANTS, ctl, bucket, "1", "3"))
    assert got["states"] == {"pending": 1024, "failed": 1976}, got
    assert got["codes"] == {"TooMany": 1976}, got
    # It left: what it alone waited on leaves the queue (only downloads already in flight go on).
    d.wait_until(lambda st: st["objects"]["queued"] <= 2, 60, "the departed member's demand to be dropped")
    # Five connections of one uid: 4,096 wait in all, whatever the number of connections.
    got = json.loads(as_member(member, MISSING_WANTS, ctl, bucket, "5", "1"))
    assert got["states"] == {"pending": 4096, "failed": 904}, got
    d.wait_until(lambda st: st["objects"]["queued"] <= 2, 60, "the member's demand to be dropped again")


# ``count`` order requests on one connection, each under a new reader id (argv: the request's JSON);
# prints how many were answered ok.
MANY_ORDERS = r"""
import json, socket, sys
sock, count, msg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("rb")
ok = 0
for i in range(0, count, 100):
    s.sendall(b"".join(json.dumps({**msg, "reader": f"made-up-{j}"}).encode() + b"\n" for j in range(i, i + 100)))
    for _ in range(100):
        ok += bool(json.loads(f.readline()).get("ok"))
print(ok)
"""


def test_orders_under_made_up_reader_ids_stay_within_the_reader_cap(shared_cache, s3, bucket, daemons,
                                                                    tmp_path):
    from conftest import write_manifest

    from s3cache.daemon.announce import MAX_READERS
    from s3cache.policy.order import list_digest

    member, cache = shared_cache
    uris = [f"s3://{bucket}/o/{i}" for i in range(8)]
    for u in uris:
        s3.put_object(Bucket=bucket, Key=u.split("/", 3)[3], Body=b"o")
    d = daemons(cache, manifest=write_manifest(tmp_path / "m.txt", uris))
    msg = {"op": "order", "seed": 1, "epoch": 0, "n": len(uris), "start": 0, "list": list_digest(uris)}
    n = MAX_READERS + 100 - MAX_READERS % 100  # past the cap, in batches of 100
    assert as_member(member, MANY_ORDERS, Layout(str(cache)).control_socket, str(n), json.dumps(msg)).strip() == str(n)
    assert d.status()["readers"] <= MAX_READERS


def test_order_lists_count_their_real_memory_and_shares_are_bounded():
    """Lists (policy/order.py) on what a reader can send: a list of keys of 4-byte characters is
    counted at its real size (the 512 MiB cap was ~4x too lax), and a new share per request does not
    grow the daemon (each share's digest is remembered, at most MAX_SHARES)."""
    import tracemalloc

    from s3cache.policy.order import MAX_SHARES, Lists, list_digest

    uris = [f"s3://b/{chr(0x1F600 + i % 64) * 200}{i}" for i in range(5000)]
    digest = list_digest(uris)
    lists = Lists()
    tracemalloc.start()
    try:
        for off in range(0, len(uris), 1000):
            lists.upload(digest, off, len(uris), [str(u.encode().decode()) for u in uris[off:off + 1000]])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(lists._sizes.values()) >= 0.9 * held
    manifest = [f"s3://b/{i}" for i in range(64)]
    token = object()
    for count in range(2, 2 + 4 * MAX_SHARES):
        lists.map_for("no such digest", 1, (0, count), token=token, manifest_n=len(manifest),
                      manifest_uris=lambda: iter(manifest), position_of=lambda u: None)
    assert len(lists._digests) <= MAX_SHARES


def _raw(member, sock_path: str, msg: dict) -> dict:
    code = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(sys.argv[2].encode()+b'\\n'); print(s.makefile().readline())")
    return json.loads(as_member(member, code, sock_path, json.dumps(msg)))


def test_verify_all_or_source_needs_the_daemons_user_and_verifies_never_starve_wants(
        shared_cache, s3, bucket, daemons, moto):
    import select
    import socket

    from s3cache.sockets.control import HANDLER_THREADS, Client
    from s3cache.testing.faultproxy import FaultProxy

    member, cache = shared_cache
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"v/{i}", Body=bytes([i]) * KiB)
    s3.put_object(Bucket=bucket, Key="later", Body=b"later")
    uris = [f"s3://{bucket}/v/{i}" for i in range(3)]
    with FaultProxy(moto.port) as proxy:
        d = daemons(cache, args=["--endpoint-url", proxy.url])
        for u in uris:
            resolve(u, cache_dir=cache, timeout=120)
        ctl = Layout(str(cache)).control_socket
        # A member may re-hash files it names; not the whole cache, and not ask S3.
        for msg, what in [({"all": True}, "--all"), ({"uris": uris[:1], "source": True}, "--source")]:
            reply = _raw(member, ctl, {"op": "verify", **msg})
            assert reply.get("code") == "PermissionDenied", reply
            assert reply["error"].startswith(f"uid {member.uid} may not verify {what}: it needs the daemon's user"), reply
        assert _raw(member, ctl, {"op": "verify", "uris": uris[:1]})["report"]["ok"] == 1
        # The daemon's user sends more --source verifies than there are handler threads, while every S3
        # request takes 5 s: a status and a want are answered while none of them is.
        proxy.latency = 5.0
        verifiers = []
        for _ in range(HANDLER_THREADS + 1):
            s = socket.socket(socket.AF_UNIX)
            s.connect(ctl)
            s.sendall(json.dumps({"op": "verify", "all": True, "source": True}).encode() + b"\n")
            verifiers.append(s)
        with Client(ctl, str(cache), timeout=120) as c:
            assert "status" in c.request({"op": "status"})
            # Those answered now were refused Busy (beyond the queue); the rest still verify.
            answered = select.select(verifiers, [], [], 0)[0]
            for s in answered:
                assert b'"code":"Busy"' in s.recv(1 << 16)
            assert len(answered) < len(verifiers)
            reply = c.request({"op": "want", "reader": "r", "uris": [f"s3://{bucket}/later"]})
            assert reply["results"][0]["state"] == "pending"
            assert select.select([s for s in verifiers if s not in answered], [], [], 0)[0] == []
        proxy.latency = 0.0
        for s in verifiers:
            s.close()
        assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()[-3000:]


# Opens ``count`` connections to ctl.sock and keeps them, then says hello on one more; prints how
# many of the kept ones were refused (an error line, then closed) and the last answer.
HOLD_CONNECTIONS = r"""
import json, select, socket, sys
sock, count = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    held.append(s)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
try:
    s.sendall(b'{"op": "hello"}\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # refused at accept and already closed: its answer (Busy) is still there to read
last = json.loads(s.makefile().readline())
# Refusals are sent at accept, in order: all are there once the last connection was answered.
refused = sum(b"Busy" in h.recv(4096) for h in select.select(held, [], [], 1.0)[0]) if held else 0
print(json.dumps({"refused": refused, "last": last}))
"""


def test_one_member_cannot_take_every_control_connection(shared_cache, local_user, daemons):
    from s3cache.sockets.control import MAX_CONNECTIONS_PER_UID

    member, cache = shared_cache
    other = local_user(groups=tuple(member.groups))
    d = daemons(cache)
    ctl = Layout(str(cache)).control_socket
    hog = member.popen([PY, "-c", HOLD_CONNECTIONS.replace("print(", "input(); print("), ctl,
                        str(MAX_CONNECTIONS_PER_UID + 50)], stdin=-1, stdout=-1, stderr=-1, text=True)
    try:
        d.wait_until(lambda st: st["sockets"]["refused_uid"] >= 50, 60, "the member's extra connections to be refused")
        # Another member (and the daemon's own user) still get a connection and an answer.
        got = json.loads(as_member(other, HOLD_CONNECTIONS, ctl, "3"))
        assert got["refused"] == 0 and got["last"]["ok"], got
        # The member's 128, this status request's, and the other member's 4 if their close is not yet seen
        assert d.status()["sockets"]["connections"] <= MAX_CONNECTIONS_PER_UID + 1 + 4
        out, err = hog.communicate("\n", timeout=120)
        assert hog.returncode == 0, err
        got = json.loads(out)
        assert got["refused"] == 50 and got["last"].get("code") == "Busy", got
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()


def test_a_process_holds_its_threads_fresh_files_then_only_its_two_newest():
    """Leases per process (the holder the daemon names uid:pid|thread): each thread's two newest files
    are held for ``recent`` seconds (each thread opens its own soon), then only the process's two
    newest, for the rest of ``--lease``: four finished threads no longer hold eight files."""
    from s3cache.policy.leases import Leases

    leases = Leases(lease=600.0, budget=0, recent=10.0, uid_cap=4 * KiB, uncapped=("0",))
    for i in range(8):  # four threads, two files each, one process
        leases.saw(f"1000:42|t{i // 2}", f"s3://b/{i}", KiB, now=100.0 + i * 0.01)
    assert len(leases.held(101.0)) == 4  # fresh, but the uid's cap (4 KiB) holds
    for i in range(8):
        leases.saw(f"0:7|t{i // 2}", f"s3://b/root/{i}", KiB, now=100.0 + i * 0.01)
    assert {u for u in leases.held(101.0) if "/root/" in u} == {f"s3://b/root/{i}" for i in range(8)}  # root: no cap
    assert leases.held(111.0) == {"s3://b/6", "s3://b/7", "s3://b/root/6", "s3://b/root/7"}


# == smaller: credentials in URLs, invisible characters in keys, a listing that strays ===============


@pytest.mark.parametrize("password", ["p@ss@word", "a/b", "x#y", "q?z", "plain"])
def test_a_password_in_a_url_is_masked_whatever_it_holds(password):
    from s3cache.service.kinds import Url, redact_url, redact_urls

    url = f"https://key:{password}@minio.internal:9000/"
    assert redact_url(url) == Url().format(url) == "https://key:***@minio.internal:9000/"
    text = f"could not reach {url} (timed out); then http://u:{password}@other/"
    assert redact_urls(text) == "could not reach https://key:***@minio.internal:9000/ (timed out); then http://u:***@other/"


@pytest.mark.parametrize("ch", ["\x85", "\u2028", "\x9b", "\u202e", "\u200b", "\ufeff"])
def test_c1_controls_and_bidi_characters_take_the_hashed_layout_and_are_never_printed_raw(ch):
    from s3cache.manifest.catalog import format_entry
    from s3cache.manifest.parse import Entry, parse_line
    from s3cache.manifest.refs import make_ref, printable
    from s3cache.store.paths import HASHED_DIR, candidates

    ref = make_ref("bkt", f"data/evil{ch}gpj.exe")
    assert candidates(ref) == (candidates(ref)[0],) and candidates(ref)[0].startswith(HASHED_DIR + "/")
    line = format_entry(Entry(ref, 3))
    assert ch not in line and parse_line(line) == Entry(ref, 3)
    assert ch not in printable(ref.uri)


def test_a_listing_that_strays_outside_the_prefix_is_skipped(s3, bucket):
    from botocore.stub import Stubber

    from s3cache.fetch.listing import manifest_lines
    from s3cache.manifest.parse import SkipLog

    stub = Stubber(s3)
    stub.add_response("list_objects_v2", {
        "IsTruncated": False, "KeyCount": 2, "Name": bucket, "Prefix": "train/",
        "Contents": [{"Key": "train/a", "Size": 1}, {"Key": "secret/b", "Size": 1}]},
        {"Bucket": bucket, "Prefix": "train/"})
    skipped = SkipLog(log_first=0)
    with stub:
        lines = list(manifest_lines(s3, bucket, "train/", skipped=skipped))
    assert lines == [f"s3://{bucket}/train/a size=1"]
    assert skipped.count == 1 and "outside the prefix" in skipped.items[0].reason


def _metrics_threads_busy(port: int) -> bool:
    """Whether the daemon still has a connection to its metrics port open (ESTABLISHED or CLOSE_WAIT on
    the listening port's side): each is a thread serving it."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[1].endswith(f":{port:04X}") and r[3] in ("01", "08") for r in rows)


# Holds ``count`` idle TCP connections to the metrics port until its stdin closes.
HOLD_TCP = r"""
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print("holding", flush=True)
sys.stdin.read()
"""


def test_an_outsider_holding_metrics_connections_costs_bounded_threads_and_idle_ones_are_closed(
        local_user, tmp_path, daemons):
    import socket
    import urllib.request

    from s3cache.service.metrics import MAX_CONNECTIONS
    from s3cache.testing import wait_for

    if not os.path.exists(PY):
        pytest.skip(f"needs {PY} to run a client as another user")
    outsider = local_user()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = daemons(args=["--metrics-addr", f"127.0.0.1:{port}"])
    threads = lambda: len(os.listdir(f"/proc/{d.proc.pid}/task"))
    hog = outsider.popen([PY, "-c", HOLD_TCP, str(port), "300"], stdin=-1, stdout=-1, text=True)
    try:
        assert hog.stdout.readline().strip() == "holding"
        peak = threads()
        # Idle connections are closed: a scrape gets through while the outsider still holds its sockets.
        def scraped() -> bool:
            try:
                return b"s3cache_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            except OSError:
                return False
        wait_for(scraped, 120, "a scrape to be served beside the idle connections")
        peak = max(peak, threads())
        assert d.status()["pid"] == d.proc.pid
    finally:
        hog.stdin.close()
        hog.wait(60)
    # Once the outsider left and its connections' threads ended, what is left is the daemon's own: the
    # outsider cost at most one thread per metrics connection slot (it was one per connection: 300).
    wait_for(lambda: not _metrics_threads_busy(port), 60, "the metrics connections to end")
    assert peak <= threads() + MAX_CONNECTIONS, (peak, threads())


# == job files under --manifest-dir, planted by a member ===========================================

LOAD_DIR = r"""
import sys
from s3cache.errors import ManifestError
from s3cache.manifest.file import load_dir
try:
    loaded = load_dir(sys.argv[1], lambda bucket, prefix: iter(()), settle=0)
    print("loaded", len(loaded.catalog))
except ManifestError as e:
    print("refused", e)
"""


@pytest.mark.parametrize("plant", ["environ", "fifo", "zero", "secret line", "long line"])
def test_job_files_a_member_plants_are_refused_without_hanging_or_quoting_them(shared_cache, tmp_path, plant):
    import subprocess
    import sys

    member, cache = shared_cache
    jobs = cache.parent / "jobs"  # under the sticky 1777 dir: the member can reach it
    jobs.mkdir()
    os.chown(jobs, member.uid, member.gid)
    (jobs / "good.txt").write_text("s3://bkt/a size=1\n")
    script = {"environ": "ln -s /proc/self/environ bad.txt",
              "fifo": "mkfifo bad.txt",
              "zero": "ln -s /dev/zero bad.txt",
              "secret line": "echo 'AWS_SECRET_ACCESS_KEY=s3ct-secret-xyz s3://bkt/b' > bad.txt",
              "long line": "head -c 100000 /dev/zero | tr '\\0' x > bad.txt"}[plant]
    r = member.run(["sh", "-c", f"cd {jobs} && {script}"])
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "AWS_SECRET_ACCESS_KEY"}
    env = {"AWS_SECRET_ACCESS_KEY": "s3ct-secret-xyz", **env}  # first: /proc/self/environ starts with it
    out = subprocess.run([sys.executable, "-c", LOAD_DIR, str(jobs)], capture_output=True, text=True, env=env,
                         check=False,
                         timeout=60)  # a FIFO hung this for good
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"refused {jobs}/bad.txt"), out.stdout
    assert "s3ct-secret-xyz" not in out.stdout + out.stderr
    assert len(out.stdout) < 1000  # no file content echoed


def test_a_reader_refuses_a_cache_dir_an_outsider_planted_and_never_follows_a_link_out(local_user):
    """An outsider who creates the cache dir first in a shared sticky parent (the daemon refuses it):
    resolve() returned the outsider's bytes for one key and, for another, a path leading to
    /etc/hostname."""
    from s3cache.errors import UntrustedCacheDir

    outsider = local_user()
    shared = Path(tempfile.mkdtemp(prefix="s3ct-planted-", dir="/tmp"))
    try:
        os.chmod(shared, 0o1777)
        cache = shared / "cache"
        plant = (f"umask 022 && mkdir -p {cache}/.s3cache {cache}/bkt && "
                 f"echo forged > {cache}/bkt/data && ln -s /etc/hostname {cache}/bkt/host")
        r = outsider.run(["sh", "-c", plant])
        assert r.returncode == 0, r.stderr
        for key in ("data", "host"):
            with pytest.raises(UntrustedCacheDir, match="anyone may create it first"):
                resolve(f"s3://bkt/{key}", cache_dir=cache, timeout=5)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_symlink_in_a_trusted_cache_dir_is_never_returned(tmp_path, store):
    """Even in a dir the reader trusts, a path is returned only for a regular file of the dir's owner,
    never through a symlink at the end of it."""
    os.makedirs(tmp_path / "cache" / "bkt", exist_ok=True)
    os.symlink("/etc/hostname", tmp_path / "cache" / "bkt" / "host")
    from s3cache.errors import DaemonNotRunning

    with pytest.raises(DaemonNotRunning):  # not cached: it asks the daemon (there is none here)
        resolve("s3://bkt/host", cache_dir=tmp_path / "cache", timeout=5)


# ``count`` wants of one missing object each on one connection; then stays until stdin closes.
MANY_WANTS = r"""
import json, socket, sys
sock, bucket, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("rb")
for i in range(count):
    s.sendall(json.dumps({"op": "want", "reader": "m", "uris": [f"s3://{bucket}/flood/{i}"]}).encode() + b"\n")
    while "results" not in json.loads(f.readline()):
        pass
print("sent", flush=True)
sys.stdin.read()
"""


def test_a_members_flood_of_wants_does_not_push_another_uids_want_back(shared_cache, s3, bucket, daemons,
                                                                        slow_s3):
    from s3cache.sockets.control import Client

    member, cache = shared_cache
    d = daemons(cache, args=["--endpoint-url", slow_s3.url, "--workers", "1"])
    ctl = Layout(str(cache)).control_socket
    honest = f"s3://{bucket}/honest"
    with Client(ctl, str(cache), timeout=60) as c:
        c.request({"op": "want", "reader": "honest", "uris": [f"s3://{bucket}/first"]})  # the one worker: busy
        d.wait_until(lambda st: st["objects"]["fetching"] == 1, 60, "the only worker to be busy")
        c.request({"op": "want", "reader": "honest", "uris": [honest]})
        flood = member.popen([PY, "-c", MANY_WANTS, ctl, bucket, "500"], stdin=-1, stdout=-1, text=True)
        try:
            assert flood.stdout.readline().strip() == "sent"
            [why] = c.request({"op": "explain", "uris": [honest]})["results"]
            # Each want of the member came after ours and went to the front of the queue: ours was
            # "queued behind 500". Served in turn by uid, it is next (or already fetching).
            assert why["state"] == "fetching" or (why["state"] == "queued" and why["behind"] <= 1), why
        finally:
            flood.stdin.close()
            flood.wait(60)


def test_a_manifest_path_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    """The single --manifest is the operator's path (symlinks followed, as a ConfigMap's are), but it is
    still opened without blocking and must be a regular file: a FIFO hung the reload thread for good."""
    import subprocess
    import sys

    fifo = tmp_path / "m.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "m.zero"
    os.symlink("/dev/zero", link)
    code = ("import sys\nfrom s3cache.errors import ManifestError\nfrom s3cache.manifest.file import load\n"
            "try:\n    load(sys.argv[1], lambda b, p: iter(()), settle=0)\nexcept ManifestError as e:\n    print(e)\n")
    for path in (fifo, link):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False,
                             timeout=60)
        assert out.stdout.strip() == f"{path}: cannot read manifest: not a regular file", out


def test_the_sockets_are_bound_only_in_the_daemons_own_directory_never_through_a_link(local_user, tmp_path):
    """The sockets were unlinked, bound and chmodded by path: a directory swapped in on the way (here
    a symlink to another user's directory) received them, 0660. Now they go through the checked
    directory's descriptor, or nowhere."""
    from s3cache.errors import UntrustedCacheDir
    from s3cache.sockets.control import Server

    other = local_user()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, other.uid, other.gid)
    (tmp_path / "priv").symlink_to(theirs)
    with pytest.raises(UntrustedCacheDir, match="without following a symlink"):
        Server(str(tmp_path / "priv" / "ctl.sock"), str(tmp_path / "priv" / "use.sock"), lambda c, m: None,
               lambda c: None)
    assert os.listdir(theirs) == []
    (tmp_path / "mine").mkdir()
    os.chmod(tmp_path / "mine", 0o777)  # whatever the umask: writable by everyone
    with pytest.raises(UntrustedCacheDir, match="not the daemon's own directory"):
        Server(str(tmp_path / "mine" / "ctl.sock"), str(tmp_path / "mine" / "use.sock"), lambda c, m: None,
               lambda c: None)
