"""Who the peers are, and which of them this host has marked out for a while.

Membership comes from what the engines already give, in one fixed order on every host:

* a list, ``host:port,host:port,...`` (the order written);
* a file (``--peers /etc/s3cache/peers``): one ``host:port`` a line, ``#`` comments;
* ``tf_config``: ``TF_CONFIG``'s chief and worker tasks (the order of ``--shard auto``), each host with
  the port of ``--peer-addr``, since TF_CONFIG names TensorFlow's own ports.

(DNS of a headless Service is not read yet: write its members to a file.) This host is the member equal
to ``--peer-addr``; it must be in the list.

``Health``: a peer that failed (refused, timed out, sent wrong bytes) is skipped by this host alone for
``OUT_FOR`` seconds, doubling on repeated failures up to ``OUT_MAX``; its objects come from S3
meanwhile. Ownership does not change: the list is the same, only this host's view of it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

from s3cache.errors import ConfigError

OUT_FOR = 10.0  # seconds a failed peer is skipped at first
OUT_MAX = 300.0
_ADDR = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def _addr(text: str, where: str) -> str:
    text = text.strip()
    m = _ADDR.fullmatch(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"{where}: not HOST:PORT: {text!r} (expected e.g. 10.0.0.7:7480)")
    return text


def parse_list(text: str, where: str = "--peers") -> list[str]:
    """``host:port`` entries separated by commas, spaces or newlines (``#`` starts a comment)."""
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        for item in re.split(r"[,\s]+", line):
            if item:
                out.append(_addr(item, f"{where} line {n}" if "\n" in text else where))
    if len(set(out)) != len(out):
        dup = next(a for a in out if out.count(a) > 1)
        raise ConfigError(f"{where}: {dup} is listed twice")
    return out


def from_tf_config(raw: str | None, port: int) -> list[str]:
    """The chief and worker hosts of ``TF_CONFIG`` (chief first, as ``--shard auto`` counts them), each
    with ``port``."""
    if not raw:
        raise ConfigError("--peers tf_config: TF_CONFIG is not set")
    try:
        cluster = json.loads(raw)["cluster"]
        tasks = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError("--peers tf_config: TF_CONFIG is not JSON with a cluster") from None
    hosts = []
    for t in tasks:
        if not isinstance(t, str):
            raise ConfigError(f"--peers tf_config: TF_CONFIG task {t!r} is not HOST:PORT")
        hosts.append(f"{t.rsplit(':', 1)[0]}:{port}")
    if not hosts:
        raise ConfigError("--peers tf_config: TF_CONFIG lists no chief or worker")
    return hosts


def resolve(peers: str, me: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The fleet's hosts in order from ``--peers`` (a list, a file, or ``tf_config``); ``me`` must be
    one of them. Raises ConfigError naming what is wrong."""
    environ = os.environ if environ is None else environ
    me = _addr(me, "--peer-addr")
    text = peers.strip()
    if text.lower() == "tf_config":
        hosts = from_tf_config(environ.get("TF_CONFIG"), int(me.rsplit(":", 1)[1]))
    elif "," not in text and not _ADDR.fullmatch(text):
        try:
            body = Path(text).read_text()
        except OSError as e:
            raise ConfigError(f"--peers {text}: {e.strerror} (give HOST:PORT,... or a file of them)") from None
        hosts = parse_list(body, f"--peers {text}")
    else:
        hosts = parse_list(text)
    if me not in hosts:
        raise ConfigError(f"--peer-addr {me} is not in --peers ({len(hosts)} hosts): every host must find "
                          f"itself in the list")
    return hosts


class Health:
    """This host's view of its peers: which are out, until when, and why. Thread-safe."""

    def __init__(self, hosts: list[str], me: str) -> None:
        self._lock = threading.Lock()
        self._out: dict[str, tuple[float, float, str]] = {}  # host -> (until, period, why)
        self.errors: dict[str, dict[str, int]] = {h: {} for h in hosts if h != me}

    def usable(self, host: str, now: float) -> bool:
        with self._lock:
            out = self._out.get(host)
            return out is None or now >= out[0]

    def fail(self, host: str, why: str, now: float) -> None:
        """``host`` failed (``why``: refused, timeout, bad-bytes, ...): skip it for a while."""
        with self._lock:
            counts = self.errors.setdefault(host, {})
            counts[why] = counts.get(why, 0) + 1
            prev = self._out.get(host)
            if prev is not None and now < prev[0]:
                return  # a transfer begun before it was marked out: already out, for as long
            period = OUT_FOR if prev is None or now >= prev[0] + prev[1] else min(prev[1] * 2, OUT_MAX)
            self._out[host] = (now + period, period, why)

    def status(self, now: float) -> dict:
        with self._lock:
            out = {h: {"for": round(u - now, 1), "why": why} for h, (u, _, why) in self._out.items() if u > now}
            return {"healthy": sorted(h for h in self.errors if h not in out), "out": out,
                    "errors": {h: dict(c) for h, c in self.errors.items() if c}}
