"""Hanging up on S3 when the daemon stops: every connection to the endpoint, including requests still
waiting for their answer's headers.

``Streams.abort`` wakes reads blocked on a response body, whose socket it can reach. A request still
waiting for its headers has no response object yet, and botocore gives no handle on its connection, so
a stop while S3 is slow to answer used to wait for the read timeout (more than 15 s). This module finds
the sockets themselves: every TCP socket of this process connected or connecting to the endpoint's port
(or a configured proxy's) is shut down, which makes a blocked ``recv`` return at once and ends a
connection attempt to an endpoint that drops it; the request then fails, and the retry policy, seeing
``cancel`` set, ends it as ``Cancelled``.

Linux only (``/proc/self/fd``, ``/proc/net/tcp``); elsewhere it does nothing and a stop waits for the read timeout, as
before. Only for stopping: it also cuts idle pooled connections, and any other connection of the
process to the same port.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlsplit

_DEFAULT_PORT = {"https": 443, "http": 80}
_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def endpoint_ports(client) -> set[int]:
    """The TCP ports a botocore client's requests go to: its endpoint's, and any proxy's."""
    urls = [client.meta.endpoint_url]
    proxies = getattr(client.meta.config, "proxies", None) or {}
    urls += list(proxies.values()) + list(urllib.request.getproxies().values())
    ports = set()
    for url in urls:
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            ports.add(parts.port or _DEFAULT_PORT.get(parts.scheme, 80))
        except ValueError:  # a malformed proxy variable: not ours to judge here
            continue
    return ports


def hang_up(ports: set[int]) -> int:
    """Shut down (both ways) every TCP socket of this process connected, or connecting, to a port in
    ``ports``; how many. A socket still connecting (SYN sent to an endpoint that drops it) is
    disconnected by the shutdown too, which wakes the thread waiting for the connection. Descriptors are
    borrowed, never closed: their owners close them as the requests fail."""
    peers = _peer_ports()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    n = 0
    for name in fds:
        fd = int(name)
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if not link.startswith("socket:[") or peers.get(int(link[8:-1])) not in ports:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
            n += 1
        except OSError:  # ended meanwhile
            pass
        finally:
            sock.detach()
    return n


def _peer_ports() -> dict[int, int]:
    """Socket inode -> remote port, for this network namespace's TCP sockets that have a peer (connected
    or connecting: getpeername tells only the former)."""
    out: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] == _LISTEN:
                continue
            port = int(fields[2].rsplit(":", 1)[1], 16)
            if port:
                out[int(fields[9])] = port
    return out
