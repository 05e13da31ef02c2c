"""``python -m s3cache.testing.faultproxy UPSTREAM_PORT LATENCY [BANDWIDTH [stats]]``: a fault proxy in a
process of its own (the benchmarks run it so, apart from the contenders), answering "stats" and "links"
lines on stdin with its counters."""

from __future__ import annotations

from s3cache.testing.faultproxy import FaultProxy


def main() -> None:
    """Run a latency proxy in its own process: ``python -m s3cache.testing.faultproxy UPSTREAM_PORT LATENCY``.
    Prints the port it listens on, then serves until killed."""
    import sys
    import time

    p = FaultProxy(int(sys.argv[1]), latency=float(sys.argv[2]),
                   bandwidth=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0).start()
    print(p.port, flush=True)
    try:
        if len(sys.argv) > 4 and sys.argv[4] == "stats":
            # Answer each "stats" line on stdin with the counters, as JSON, one line.
            import json

            # "links T0 T1" answers with the busy and streaming profiles of that span (monotonic times,
            # which are the same clock in every process) and the request log, then clears the log.
            for line in sys.stdin:
                words = line.split()
                if words and words[0] == "links":
                    t0, t1 = float(words[1]), float(words[2])
                    with p.lock:
                        log, p.request_bytes = p.request_bytes, []
                        peak = p.peak_busy
                        p.peak_busy = p._busy
                    out = {"busy": {str(k): v for k, v in p.busy_profile(t0, t1).items()},
                           "streaming": p.streaming(t0, t1), "peak": peak, "requests": log}
                    print(json.dumps(out), flush=True)
                    continue
                with p.lock:
                    gets = sum(n for (m, _), n in p.requests.items() if m == "GET")
                    out = {"gets": gets, "requests": sum(p.requests.values()), "bytes": p.bytes_sent,
                           "connections": p.connections}
                print(json.dumps(out), flush=True)
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    p.stop()
