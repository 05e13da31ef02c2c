"""Who the peers are, and which of them this host has marked out for a while.

Membership comes from what the engines already give, in one fixed order on every host:

* a list, ``host:port,host:port,...`` (the order written);
* a file (``--peers /etc/s3cache/peers``): one ``host:port`` a line, ``#`` comments;
* ``tf_config``: ``TF_CONFIG``'s chief and worker tasks (the order of ``--shard auto``), each host with
  the port of ``--peer-addr``, since TF_CONFIG names TensorFlow's own ports;
* ``dns:NAME``: the addresses NAME resolves to (a headless Service lists its ready pods so), sorted,
  each with ``--peer-addr``'s port; IPv4 unless ``--peer-addr`` is an IPv6 address.

This host is the member equal to ``--peer-addr``; it must be in a list, file or TF_CONFIG. DNS lists a
pod only once it is ready, so from DNS this host is added to what it resolves.

``Membership`` reads a file or DNS again every ``REFRESH`` seconds (``refresh``), so hosts that come
and go change the owners without a restart; a list and TF_CONFIG are fixed. Rendezvous hashing moves
only the objects of a host that left or joined.

``Health``: a peer that failed (refused, timed out, sent wrong bytes) is skipped by this host alone for
``OUT_FOR`` seconds, doubling on repeated failures up to ``OUT_MAX``; its objects come from S3
meanwhile. Ownership does not change: the list is the same, only this host's view of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from s3cache.errors import ConfigError
from s3cache.service.config import peer_address

from .owners import RendezvousOwners

log = logging.getLogger("s3cache.peer")
REFRESH = 30.0  # seconds between two reads of a file or DNS

OUT_FOR = 10.0  # seconds a failed peer is skipped at first
OUT_MAX = 300.0
_ADDR = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def _addr(text: str, where: str) -> str:
    return peer_address(text, where)  # one spelling per address: hosts are compared as text


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


def from_dns(name: str, me: str, lookup: Callable = socket.getaddrinfo) -> list[str]:
    """The addresses ``name`` resolves to, sorted, with ``me``'s port, and ``me`` among them, each in
    ``peer_address``'s one spelling (getaddrinfo writes an IPv4-mapped IPv6 address dotted, which
    ``--peer-addr`` never is once parsed: the two would never match)."""
    me = _addr(me, "--peer-addr")
    host, port = me.rsplit(":", 1)
    v6 = host.startswith("[")
    try:
        infos = lookup(name, int(port), socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"--peers dns:{name}: {e}") from None
    hosts = {_addr(f"[{i[4][0]}]:{port}" if v6 else f"{i[4][0]}:{port}", f"--peers dns:{name}") for i in infos}
    hosts.add(me)
    return sorted(hosts)


def source_kind(peers: str) -> str:
    """What ``--peers`` names: ``dns``, ``tf_config``, ``file`` or ``list``."""
    text = peers.strip()
    if text.lower().startswith("dns:"):
        return "dns"
    if text.lower() == "tf_config":
        return "tf_config"
    return "file" if "," not in text and not _ADDR.fullmatch(text) else "list"


def resolve(peers: str, me: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The fleet's hosts in order from ``--peers`` (a list, a file, ``tf_config`` or ``dns:NAME``);
    ``me`` must be one of them. Raises ConfigError naming what is wrong."""
    environ = os.environ if environ is None else environ
    me = _addr(me, "--peer-addr")
    text, kind = peers.strip(), source_kind(peers)
    if kind == "dns":
        return from_dns(text[4:], me)
    if kind == "tf_config":
        hosts = from_tf_config(environ.get("TF_CONFIG"), int(me.rsplit(":", 1)[1]))
    elif kind == "file":
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
        self._me = me
        self._out: dict[str, tuple[float, float, str]] = {}  # host -> (until, period, why)
        self.errors: dict[str, dict[str, int]] = {h: {} for h in hosts if h != me}

    def set_hosts(self, hosts: list[str]) -> None:
        """The fleet changed: report on these hosts (a host gone is forgotten, with its errors)."""
        with self._lock:
            self.errors = {h: self.errors.get(h, {}) for h in hosts if h != self._me}
            self._out = {h: v for h, v in self._out.items() if h in self.errors}

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


class Membership:
    """The hosts and their owners table now. ``owner`` reads one attribute, which ``refresh`` replaces
    whole, so a lookup never sees half a change. Only the refresh thread calls ``refresh``."""

    def __init__(self, peers: str, me: str, health: Health | None = None) -> None:
        self.peers = peers
        self.me = me
        self._health = health
        self.hosts = resolve(peers, me)
        self._owners = RendezvousOwners(self.hosts)
        self.changes = 0
        self.dynamic = source_kind(peers) in ("dns", "file")

    def owner(self, uri: str) -> str:
        return self._owners.owner(uri)

    def refresh(self) -> bool:
        """Read the file or DNS again; True if the hosts changed. A read that fails keeps the hosts
        (logged): a DNS hiccup must not shrink the fleet to this host alone."""
        if not self.dynamic:
            return False
        try:
            hosts = resolve(self.peers, self.me)
        except ConfigError as e:
            log.warning("peers not read again, keeping %d hosts: %s", len(self.hosts), e)
            return False
        if hosts == self.hosts:
            return False
        log.info("peers: %d hosts now (was %d): +%s -%s", len(hosts), len(self.hosts),
                 sorted(set(hosts) - set(self.hosts)), sorted(set(self.hosts) - set(hosts)))
        self._owners = RendezvousOwners(hosts)
        self.hosts = hosts
        self.changes += 1
        if self._health is not None:
            self._health.set_hosts(hosts)
        return True

