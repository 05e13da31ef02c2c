"""The sd_notify protocol: tell systemd (``Type=notify``) that the daemon is ready, what it is doing,
that it is alive, reloading or stopping.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a path, or an abstract name written with a leading ``@``); see sd_notify(3). Without ``$NOTIFY_SOCKET``
(not run by systemd) every call is a no-op, so the daemon calls these unconditionally.

Conventions followed (systemd.service(5)): READY=1 once serving, RELOADING=1 with MONOTONIC_USEC when a
reload starts and READY=1 when it is done (so ``systemctl reload`` waits for it under systemd >= 253),
STOPPING=1 when shutting down, WATCHDOG=1 at least every ``watchdog_interval()``/2 when ``WatchdogSec=``
is set, STATUS= one free-form line.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from .config import human_size

__all__ = ["notify", "ready", "reloading", "status", "stopping", "watchdog", "watchdog_interval", "Watchdog",
           "progress_line"]


def _address(environ: Mapping[str, str]) -> str | None:
    addr = environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        return "\0" + addr[1:]  # an abstract socket
    if addr.startswith("/"):
        return addr
    return None  # unset, or a transport this daemon has no use for (vsock)


def notify(environ: Mapping[str, str] | None = None, **fields: object) -> bool:
    """Send ``FIELD=value`` lines (names upper-cased: ``status="x"`` -> ``STATUS=x``) in one datagram.

    Returns whether a message was sent: False without ``$NOTIFY_SOCKET`` or when the send failed (the
    daemon goes on; systemd's start or watchdog timeout is what reports a manager that cannot be told).
    A value may not contain a newline: it would start a field of its own.
    """
    addr = _address(os.environ if environ is None else environ)
    if addr is None or not fields:
        return False
    lines = []
    for name, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"sd_notify {name.upper()}= may not contain a newline: {text!r}")
        lines.append(f"{name.upper()}={text}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
    except OSError:
        return False
    return True


def ready(status_line: str | None = None) -> bool:
    """The daemon serves (startup done, or a reload finished)."""
    return notify(ready=1, **({"status": status_line} if status_line is not None else {}))


def reloading() -> bool:
    """A reload starts; call ``ready()`` when it is done."""
    return notify(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


def stopping(status_line: str | None = None) -> bool:
    return notify(stopping=1, **({"status": status_line} if status_line is not None else {}))


def status(line: str) -> bool:
    return notify(status=line)


def extend_timeout(seconds: float, line: str | None = None) -> bool:
    """Still starting (or stopping), and moving: systemd's start (stop) timeout is extended to at least
    ``seconds`` from now (EXTEND_TIMEOUT_USEC; systemd 236+, ignored by older ones)."""
    return notify(extend_timeout_usec=int(seconds * 1_000_000), **({"status": line} if line is not None else {}))


def progress_line(objects_done: int, objects_total: int, bytes_done: int, bytes_total: int | None,
                  bytes_per_s: float) -> str:
    """The STATUS= line ``systemctl status`` shows: ``"412/1000 objects, 31.2 GiB of 80.0 GiB, 1.9 GiB/s"``
    (``bytes_total`` None: the total is unknown, only what landed is shown)."""
    of = f" of {human_size(bytes_total)}" if bytes_total is not None else ""
    return (f"{objects_done}/{objects_total} objects, {human_size(bytes_done)}{of}, "
            f"{human_size(bytes_per_s)}/s")


def watchdog() -> bool:
    """One keep-alive. Send it from the loop whose hang should get the daemon restarted."""
    return notify(watchdog=1)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd wants a keep-alive (``WatchdogSec=``), or None when it wants none:
    ``$WATCHDOG_USEC`` unset, or ``$WATCHDOG_PID`` naming another process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6


class Watchdog:
    """Keep-alives at half systemd's interval, from whichever loop calls ``kick()`` each iteration.

    Invariant: ``kick()`` sends at most one WATCHDOG=1 per ``period`` and never without a watchdog
    configured, so calling it on every iteration of a busy loop is cheap.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        interval = watchdog_interval(environ)
        self.environ = environ
        self.period = interval / 2 if interval else None
        self._last = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.period is not None

    def kick(self) -> bool:
        """Send WATCHDOG=1 if half the interval passed since the last one; returns whether it did."""
        if self.period is None:
            return False
        now = time.monotonic()
        if now - self._last < self.period:
            return False
        self._last = now
        return notify(self.environ, watchdog=1)
