"""Prometheus metrics for the daemon: ``serve_metrics(addr, snapshot)`` serves ``/metrics`` over HTTP.

Everything but the fetch histograms is derived from the daemon's status dict (the one ``s3cache status
--json`` prints), read ONCE per scrape, so the figures of one scrape are consistent with each other and
with ``status``: nothing is counted twice in two places. Names follow Prometheus' conventions:
``s3cache_`` prefix, base units (bytes, seconds, ratios), ``_total`` on counters.

Fetch latency cannot be read back from status, so the daemon records each fetch as it finishes with
``FetchHistogram.record_fetch(seconds, nbytes)``; the exporter reads the histogram in the same scrape.

The listener is loopback by default: metrics name no object, but they do tell anyone who can reach
them how busy the host is. ``allow_remote=True`` is the explicit opt-in for a scraper on the network.
Any local user can connect, so the listener serves at most ``MAX_CONNECTIONS`` connections at once (one
thread each; more are closed at once) and closes one that sends nothing for ``IDLE_TIMEOUT`` seconds:
idle connections cost the daemon neither threads nor descriptors beyond those.

``prometheus_client`` is imported only by what serves or builds metric families, never by
``FetchHistogram``: the daemon records fetches whether or not ``--metrics-addr`` is given, and must not
load the exporter it does not run.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from s3cache.errors import ConfigError

DEFAULT_ADDR = "127.0.0.1:9109"

# Fetch durations: from a small object on a warm connection (~5 ms) to a multi-GiB shard (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Object sizes: 4 KiB to 4 GiB, by powers of 4.
SIZE_BUCKETS = tuple(float(4 ** i * 1024) for i in range(1, 12))

Snapshot = Callable[[], dict]

MAX_CONNECTIONS = 16  # metrics connections served at once (a scraper needs one)
IDLE_TIMEOUT = 5.0  # seconds a metrics connection may stay silent (a scraper asks at once)


class _Buckets:
    """Counts of observations by upper bound. Not thread-safe on its own: FetchHistogram locks it.

    Invariant: ``counts[i]`` counts observations ``v`` with ``bounds[i-1] < v <= bounds[i]``;
    ``counts[-1]`` those above the last bound (the +Inf bucket); ``total`` is the sum of observed values.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out, self.total


class FetchHistogram:
    """Durations and sizes of finished fetches, recorded by the daemon's fetch workers.

    Thread-safe: ``record_fetch`` may be called from every worker at once, ``snapshot`` from the HTTP
    thread. Both histograms are updated under one lock, so a scrape sees them with equal counts.
    """

    def __init__(self, duration_bounds: Sequence[float] = DURATION_BUCKETS,
                 size_bounds: Sequence[float] = SIZE_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._seconds = _Buckets(duration_bounds)
        self._bytes = _Buckets(size_bounds)

    def record_fetch(self, seconds: float, nbytes: int) -> None:
        """One object fetched and verified: ``seconds`` from its first request to its last byte."""
        if seconds < 0 or nbytes < 0:
            raise ValueError(f"a fetch cannot take {seconds} s or carry {nbytes} bytes")
        with self._lock:
            self._seconds.observe(seconds)
            self._bytes.observe(float(nbytes))

    def snapshot(self) -> tuple[tuple[list[tuple[str, int]], float], tuple[list[tuple[str, int]], float]]:
        """(cumulative duration buckets, sum), (cumulative size buckets, sum), taken together."""
        with self._lock:
            return self._seconds.cumulative(), self._bytes.cumulative()


class StatusCollector:
    """Metric families from one status snapshot per scrape (and the fetch histogram, if given).

    Families whose status field is absent (an older daemon) are left out rather than reported as 0,
    so a dashboard shows "no data" instead of a figure that is not true.
    """

    def __init__(self, snapshot: Snapshot, histogram: FetchHistogram | None = None) -> None:
        self._snapshot = snapshot
        self._histogram = histogram

    def describe(self) -> list:
        return []  # no describe-time scrape: the daemon may not be up yet when the exporter registers

    def collect(self) -> Iterator:
        from prometheus_client.core import HistogramMetricFamily

        st = self._snapshot()
        yield from families(st)
        if self._histogram is not None:
            (dur, dur_sum), (size, size_sum) = self._histogram.snapshot()
            yield HistogramMetricFamily("s3cache_fetch_duration_seconds",
                                        "Seconds from an object's first request to its last verified byte.",
                                        buckets=dur, sum_value=dur_sum)
            yield HistogramMetricFamily("s3cache_fetch_size_bytes", "Sizes of the objects fetched.",
                                        buckets=size, sum_value=size_sum)


def _counter(name: str, doc: str, value: float):
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float):
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def families(st: dict) -> Iterator:
    """The metric families of one status dict (see the README's table of ``status --json`` fields)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from s3cache.version import __version__

    info = GaugeMetricFamily("s3cache_build_info", "The s3cache version serving this cache (always 1).",
                             labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield _gauge("s3cache_uptime_seconds", "Seconds since the daemon started.", st["uptime"])
    yield _gauge("s3cache_starting", "1 while the daemon starts (status says the step), 0 once it serves.",
                 int(st.get("state") == "starting"))
    if st.get("state") == "starting":
        return  # nothing else is known yet
    yield _gauge("s3cache_manifest_entries", "Objects the manifest lists.", st["manifest_entries"])
    if "manifest_bytes" in st:
        yield _gauge("s3cache_manifest_bytes", "Bytes of the manifest's objects whose size is known.",
                     st["manifest_bytes"]["total"])
    yield _gauge("s3cache_manifest_errors", "Manifest edits rejected since the last good one.",
                 len(st.get("manifest_errors", [])))

    objects = GaugeMetricFamily("s3cache_objects", "Objects by state: queued, fetching, ready (cached) or failed.",
                                labels=["state"])
    for state, n in sorted(st["objects"].items()):
        objects.add_metric([state], n)
    yield objects

    yield _counter("s3cache_fetched_objects", "Objects fetched from S3 and verified.", st["fetched"])
    yield _counter("s3cache_fetched_bytes", "Bytes fetched from S3 into verified files.", st["fetched_bytes"])
    yield _counter("s3cache_fetch_failures", "Fetches that failed for good (each failure counted once).",
                   st["failures_total"])
    failed = GaugeMetricFamily("s3cache_failed_objects",
                               "Objects failed now, by S3 error code (code=\"unlisted\": past status's list).",
                               labels=["code"])
    by_code: dict[str, int] = {}
    for f in st["failures"]:
        by_code[f["code"]] = by_code.get(f["code"], 0) + 1
    unlisted = st["objects"]["failed"] - len(st["failures"])
    if unlisted > 0:
        by_code["unlisted"] = unlisted
    for code, n in sorted(by_code.items()):
        failed.add_metric([code], n)
    yield failed
    if "errors_by_code" in st:
        errors = CounterMetricFamily("s3cache_fetch_errors", "Failed fetches by S3 error code, since start.",
                                     labels=["code"])
        for code, n in sorted(st["errors_by_code"].items()):
            errors.add_metric([code], n)
        yield errors
    yield _counter("s3cache_s3_requests", "Requests sent to S3.", st["requests"])
    yield _counter("s3cache_s3_retries", "Requests to S3 retried (throttled, timed out, reset).", st["retries"])

    b = st["bytes"]
    yield _gauge("s3cache_cache_used_bytes", "Bytes of verified files in the cache.", b["ready"])
    yield _gauge("s3cache_cache_reserved_bytes", "Bytes promised to downloads in flight.", b["reserved"])
    yield _gauge("s3cache_cache_max_bytes", "The cache's size limit (--max-size).", b["max"])
    yield _gauge("s3cache_filesystem_free_ratio", "Free fraction of the cache's filesystem.", b["free_fraction"])
    yield _gauge("s3cache_pinned_objects", "Cached objects pinned (by the CLI or the manifest).",
                 st["pinned"]["files"])
    yield _gauge("s3cache_pinned_bytes", "Bytes of pinned cached objects.", st["pinned"]["bytes"])
    yield _counter("s3cache_evicted_objects", "Files evicted to make room.", st["evicted"])
    yield _counter("s3cache_evicted_bytes", "Bytes evicted to make room.", st["evicted_bytes"])
    yield _gauge("s3cache_disk_full", "1 while prefetch is paused because the filesystem is full.",
                 int(bool(st["disk_full"])))
    if "loop_errors" in st:
        loops = CounterMetricFamily("s3cache_loop_errors", "Exceptions the daemon's loops survived, by loop.",
                                    labels=["loop"])
        for loop, n in sorted(st["loop_errors"].items()):
            loops.add_metric([loop], n)
        yield loops
    if "disk_full_pauses" in st:
        yield _counter("s3cache_disk_full_pauses", "Times prefetch paused because the filesystem was full.",
                       st["disk_full_pauses"])
    yield _gauge("s3cache_prefetch_paused", "1 while prefetch waits for room in the cache.",
                 int(bool(st["prefetch_paused"])))

    yield _gauge("s3cache_readers", "Reader processes seen recently.", st["readers"])
    yield _counter("s3cache_reader_hits", "Files a reader found cached on first look.", st["hits"])
    yield _counter("s3cache_reader_misses", "Files a reader had to wait for.", st["misses"])
    yield _counter("s3cache_reader_wait_seconds",
                   "Seconds readers spent waiting for files to land (the GPU-stall figure).", st["wait_seconds"])

    verified = GaugeMetricFamily("s3cache_verified_objects", "Cached objects by how they were verified.",
                                 labels=["method"])
    for method, n in sorted(st.get("verified_by", {}).items()):
        verified.add_metric([method], n)
    yield verified
    if "peers" in st:
        yield from _peer_families(st["peers"])


def _peer_families(p: dict) -> Iterator:
    """The peer tier's figures (status's ``peers``, present with ``--peers``)."""
    from prometheus_client.core import CounterMetricFamily

    objects = CounterMetricFamily("s3cache_source_objects", "Objects fetched, by source (s3 or peer).",
                                  labels=["source"])
    nbytes = CounterMetricFamily("s3cache_source_bytes", "Bytes fetched, by source (s3 or peer).",
                                 labels=["source"])
    for source, key in (("s3", "from_s3"), ("peer", "from_peers")):
        objects.add_metric([source], p[key]["objects"])
        nbytes.add_metric([source], p[key]["bytes"])
    yield objects
    yield nbytes
    yield _counter("s3cache_peer_served_objects", "Objects served to peers.", p["served"]["objects"])
    yield _counter("s3cache_peer_served_bytes", "Bytes served to peers.", p["served"]["bytes"])
    yield _gauge("s3cache_peers_healthy", "Peers this host asks now.", len(p["healthy"]))
    yield _gauge("s3cache_peers_out", "Peers this host skips for a while after a failure.", len(p["out"]))
    errors = CounterMetricFamily("s3cache_peer_errors", "Failed asks of a peer, by peer and why.",
                                 labels=["peer", "why"])
    for peer, counts in sorted(p["errors"].items()):
        for why, n in sorted(counts.items()):
            errors.add_metric([peer, why], n)
    yield errors
    refused = CounterMetricFamily("s3cache_peer_refused_requests", "Requests from peers refused, by why.",
                                  labels=["why"])
    for why, n in sorted(p["refused"].items()):
        refused.add_metric([why], n)
    yield refused


def parse_addr(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """``"127.0.0.1:9109"``, ``"[::1]:9109"``, ``"localhost:9109"`` or ``":9109"`` -> (host, port).

    The host must be an IP address (or ``localhost``), so what is bound is what was written. A host
    other than loopback raises ConfigError unless ``allow_remote``.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"metrics address {text!r}: expected HOST:PORT, e.g. {DEFAULT_ADDR}")
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    if host in ("", "localhost"):
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"metrics address {text!r}: the host must be an IP address, e.g. {DEFAULT_ADDR}") from None
    if not ip.is_loopback and not allow_remote:
        raise ConfigError(f"metrics address {text!r} is not loopback: anyone who can reach it can read the "
                          f"cache's metrics; allow it explicitly (--metrics-allow-remote) or use {DEFAULT_ADDR}")
    return str(ip), int(port_text)


class MetricsServer:
    """The running exporter: ``host`` and ``port`` as bound (port 0 asks for a free one); calling it (or
    ``stop()``) shuts the listener down and joins its thread. Stopping twice is harmless."""

    def __init__(self, server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = server.server_address[:2]
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    __call__ = stop

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


def serve_metrics(addr: str, snapshot: Snapshot, histogram: FetchHistogram | None = None, *,
                  allow_remote: bool = False) -> MetricsServer:
    """Serve ``/metrics`` on ``addr`` from a daemon thread; returns the server, a callable that stops it.

    ``snapshot`` returns the daemon's status dict; it is called once per scrape, from the HTTP thread.
    Raises ConfigError for a bad or (without ``allow_remote``) non-loopback address, and for a port
    already in use.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

    host, port = parse_addr(addr, allow_remote)
    registry = CollectorRegistry()
    registry.register(StatusCollector(snapshot, histogram))
    ProcessCollector(namespace="s3cache", registry=registry)  # s3cache_process_resident_memory_bytes, CPU, fds
    try:
        server = _bounded_server(host, port, make_wsgi_app(registry))
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {addr}: {e.strerror or e}") from None
    thread = threading.Thread(target=server.serve_forever, name="s3cache-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


def _bounded_server(host: str, port: int, app):
    """A threading WSGI server with at most MAX_CONNECTIONS connections served at once and IDLE_TIMEOUT
    on each (prometheus_client's own starts a thread per connection and never times one out)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Handler(WSGIRequestHandler):
        timeout = IDLE_TIMEOUT  # StreamRequestHandler puts it on the connection's socket

        def log_message(self, format: str, *args) -> None:
            pass  # a scrape a second is not news

    class Server(ThreadingMixIn, WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True
        request_queue_size = 128  # connects complete at once and are refused at once, not retried for seconds
        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

        def process_request(self, request, client_address) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # full: closed at once, the listener thread moves on
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address) -> None:
            pass  # a client that vanished or timed out: its connection is closed, nothing else to do

    server = Server((host, port), Handler)
    server.set_app(app)
    return server
