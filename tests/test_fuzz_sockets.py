"""Hypothesis fuzzes both wire formats against one running daemon: afterwards it still answers hello,
status and want, and no exception escaped any of its threads."""

from __future__ import annotations

import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3cache import resolve
from s3cache.sockets.control import Client
from s3cache.store.files import Layout

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
uris = st.one_of(st.text(max_size=60), st.builds(lambda b, k: f"s3://{b}/{k}", st.text(max_size=20),
                                                 st.text(max_size=60)))
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(["want", "status", "hello", "nope", "", "verify"]) | st.text(max_size=10)},
    optional={"uris": st.lists(uris, max_size=8) | json_values, "ahead": st.lists(uris, max_size=8) | json_values,
              "reader": json_values, "all": st.just(False), "source": st.just(False)},
)
ctl_lines = st.one_of(
    requests.map(lambda m: json.dumps(m).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)
use_records = st.lists(
    st.one_of(st.sampled_from([b"R", b"h", b"w"]).flatmap(lambda k: uris.map(lambda u: k + u.encode("utf-8", "surrogatepass")))
              .map(lambda r: r + b"\0"),
              st.binary(max_size=200)),
    max_size=10).map(b"".join)


def test_fuzzing_both_sockets_leaves_the_daemon_serving(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="k", Body=b"kk")
    d = daemons(args=["--workers", "2"])
    lay = Layout(str(d.cache_dir.absolute()))
    uri = f"s3://{bucket}/k"
    sent = {"ctl": 0, "use": 0}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(lines=st.lists(ctl_lines, min_size=1, max_size=3), notes=use_records)
    def one(lines, notes):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(lay.control_socket)
            try:
                s.sendall(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
                s.shutdown(socket.SHUT_WR)
                while s.recv(1 << 16):  # every answer, until the daemon closes after the last one
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass
        sent["ctl"] += len(lines)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(lay.use_socket)
            s.sendall(notes)
        sent["use"] += 1

    one()
    with Client(lay.control_socket, str(d.cache_dir), timeout=60) as c:
        assert c.request({"op": "hello"})["ok"]
        assert c.request({"op": "status"})["status"]["pid"] == d.proc.pid
        assert c.request({"op": "want", "uris": [uri], "reader": "after"})["results"][0]["uri"] == uri
    assert open(resolve(uri, cache_dir=d.cache_dir, timeout=120), "rb").read() == b"kk"
    log = d.log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-5000:]
    print(f"fuzzed: {sent['ctl']} control lines, {sent['use']} usage connections")


http_junk = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /metrics HTTP/1.1\r\n", b"GET ",
                     b"POST /metrics HTTP/1.0\r\nContent-Length: 99999999\r\n\r\nx", b""]),
)


def test_fuzzing_both_sockets_and_the_metrics_port_beside_a_streaming_reader(tmp_path, s3, bucket, daemons):
    """Garbage on ctl.sock, use.sock and the metrics port (some of it left open, idle) while a reader
    streams through the cache: the reader gets every byte right and finishes, and the daemon serves on."""
    import threading

    n = 40
    data = {f"s3://{bucket}/s/{i:02d}": bytes([i]) * 4096 for i in range(n)}
    for uri, body in data.items():
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=body)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemons(args=["--workers", "2", "--metrics-addr", f"127.0.0.1:{port}"])
    lay = Layout(str(d.cache_dir.absolute()))
    errors: list[str] = []
    done = threading.Event()

    def stream() -> None:
        try:
            for _ in range(2):
                for uri, body in data.items():
                    if open(resolve(uri, cache_dir=d.cache_dir, timeout=300), "rb").read() != body:
                        errors.append(f"wrong bytes for {uri}")
        except Exception as e:  # noqa: BLE001 (any failure of the reader is the test's finding)
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    idle: list[socket.socket] = []

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(lines=st.lists(ctl_lines, min_size=1, max_size=3), notes=use_records, http=http_junk,
           keep=st.booleans())
    def one(lines, notes, http, keep):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(lay.control_socket)
            try:
                s.sendall(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
                s.shutdown(socket.SHUT_WR)
                while s.recv(1 << 16):
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(lay.use_socket)
            s.sendall(notes)
        m = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            m.sendall(http)
        except OSError:
            pass
        if keep and len(idle) < 200:
            idle.append(m)  # left open and silent
        else:
            m.close()

    try:
        one()
        reader.join(600)
        assert done.is_set() and not errors, errors
    finally:
        for m in idle:
            m.close()
    with Client(lay.control_socket, str(d.cache_dir), timeout=60) as c:
        assert c.request({"op": "status"})["status"]["pid"] == d.proc.pid
    log = d.log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-5000:]
