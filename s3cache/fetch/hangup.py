"""Hanging up on S3 when the daemon stops: every connection to the endpoint, including requests still
waiting for their answer's headers.

``Streams.abort`` wakes reads blocked on a response body, whose socket it can reach. A request still
waiting for its headers has no response object yet, and botocore gives no handle on its connection, so
a stop while S3 is slow to answer used to wait for the read timeout (more than 15 s). This module finds
the sockets themselves: every connected TCP socket of this process whose peer port is the endpoint's
(or a configured proxy's) is shut down, which makes a blocked ``recv`` return at once; the request
then fails, and the retry policy, seeing ``cancel`` set, ends it as ``Cancelled``.

Linux only (``/proc/self/fd``); elsewhere it does nothing and a stop waits for the read timeout, as
before. Only for stopping: it also cuts idle pooled connections, and any other connection of the
process to the same port.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlsplit

_DEFAULT_PORT = {"https": 443, "http": 80}


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
    """Shut down (both ways) every connected TCP socket of this process whose peer port is in ``ports``;
    how many. Descriptors are borrowed, never closed: their owners close them as the requests fail."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    n = 0
    for name in fds:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:  # closed since the listing, or not a socket after all
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                if sock.getpeername()[1] in ports:  # ENOTCONN for a listening or unconnected socket
                    sock.shutdown(socket.SHUT_RDWR)
                    n += 1
        except OSError:
            pass
        finally:
            sock.detach()
    return n
