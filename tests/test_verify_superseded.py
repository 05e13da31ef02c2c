"""After ``verify --source`` finds an object changed in S3, no new ``resolve()`` is handed its old bytes as
current (issue 26 item 8), with the real daemon as a subprocess and moto:

1. while the refetch is in flight (its body held at a proxy), ``resolve()`` waits and returns the new
   bytes;
2. a refetch refused room (the old copy and a pinned file fill the cache) is retried and lands: the old
   copy, superseded, may make room for its own new version;
3. after a SIGKILL right after verify said so, the restarted daemon still never hands out the old bytes
   (the mark is in the index and on the file) and fetches the new version.

Each wait is on a condition: a download is held at a fault proxy, room by a pin, never by a sleep.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_manifest

from s3cache import resolve
from s3cache.cli import main
from s3cache.store.layout import SUPERSEDED_BIT
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy

KiB = 1024


@pytest.fixture
def stalling_proxy(moto):
    """A proxy in front of moto that, once ``armed`` is set, holds the body of every GET of key ``a``
    (``"stall"``) until ``release`` is set: a refetch certainly in flight for as long as the test needs."""
    p = FaultProxy(moto.port, stall_seconds=600).start()
    p.armed = threading.Event()
    yield p
    p.release.set()
    p.stop()


def gate(proxy: FaultProxy, bucket: str) -> None:
    proxy.plan = lambda m, p, q: ("stall" if m == "GET" and p == f"/{bucket}/a" and proxy.armed.is_set()
                                  and not proxy.release.is_set() else None)


def refetch_held(proxy: FaultProxy, bucket: str) -> None:
    wait_for(lambda: proxy.faults["stall"] >= 1, 60, "the refetch of a in flight, its body held at the proxy")


def put_two(s3, bucket: str) -> tuple[str, str]:
    for key in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(100 * KiB))
    return f"s3://{bucket}/a", f"s3://{bucket}/b"


def verify_source(d, uri: str) -> None:
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(d.cache_dir), "--source", uri])
    assert r.exit_code == 0 and "1 changed in S3" in r.output, r.output


class Resolving:
    """``resolve([uri])`` in a thread; ``got`` is what the returned path held when it returned."""

    def __init__(self, uri: str, cache_dir: Path) -> None:
        self.got: bytes | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(uri, cache_dir), daemon=True)
        self._t.start()

    def _run(self, uri: str, cache_dir: Path) -> None:
        try:
            self.got = Path(resolve([uri], cache_dir=cache_dir, timeout=120)[0]).read_bytes()
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def done(self) -> bool:
        return not self._t.is_alive()

    def result(self) -> bytes:
        self._t.join(150)
        assert not self._t.is_alive(), "resolve() did not return"
        if self.error is not None:
            raise self.error
        assert self.got is not None
        return self.got


def test_a_resolve_while_the_refetch_is_in_flight_gets_the_new_bytes(tmp_path, s3, bucket, daemons,
                                                                     stalling_proxy):
    a, b = put_two(s3, bucket)
    gate(stalling_proxy, bucket)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [a, b]),
                args=["--endpoint-url", stalling_proxy.url])
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    new = os.urandom(150 * KiB)
    s3.put_object(Bucket=bucket, Key="a", Body=new)
    stalling_proxy.armed.set()  # from now on a GET of a is held mid-body until the test releases it
    verify_source(d, a)
    refetch_held(stalling_proxy, bucket)
    path = d.cache_dir / bucket / "a"
    got = Resolving(a, d.cache_dir)
    wait_for(lambda: got.done() or d.status()["waiting"] == 1, 60, "resolve() to return or wait")
    assert path.read_bytes() != new  # the old file is still there, for readers that already have it
    stalling_proxy.release.set()
    assert got.result() == new  # never the old bytes
    assert not os.lstat(path).st_mode & SUPERSEDED_BIT
    d.wait_until(lambda st: st["fetched"] == 3, what="the new version published")


def test_a_refetch_refused_room_by_a_pin_and_its_own_old_copy_lands(tmp_path, s3, bucket, daemons):
    a, b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    s3.put_object(Bucket=bucket, Key="a", Body=os.urandom(200 * KiB))
    s3.put_object(Bucket=bucket, Key="b", Body=os.urandom(200 * KiB))
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", [a, f"{b} pin=1"]),
                args=["--max-size", str(400 * KiB)])
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    new = os.urandom(150 * KiB)  # smaller: it fits once the old copy goes, and only then (b is pinned)
    s3.put_object(Bucket=bucket, Key="a", Body=new)
    verify_source(d, a)
    path = d.cache_dir / bucket / "a"
    d.wait_until(lambda st: st["fetched"] == 3, 60, "the new version published")
    assert path.read_bytes() == new and not os.lstat(path).st_mode & SUPERSEDED_BIT
    assert Path(resolve([a], cache_dir=d.cache_dir, timeout=30)[0]).read_bytes() == new
    assert d.status()["objects"]["ready"] == 2


@pytest.mark.unclean_daemon("the first daemon is killed with SIGKILL on purpose")
def test_a_sigkill_after_verify_marked_an_object_changed_never_serves_its_old_bytes(tmp_path, s3, bucket, daemons,
                                                                                   stalling_proxy):
    a, b = put_two(s3, bucket)
    gate(stalling_proxy, bucket)
    manifest = write_manifest(tmp_path / "m.txt", [a, b])
    args = ["--endpoint-url", stalling_proxy.url]
    d = daemons(manifest=manifest, args=args)
    d.wait_until(lambda st: st["objects"]["ready"] == 2)
    new = os.urandom(150 * KiB)
    s3.put_object(Bucket=bucket, Key="a", Body=new)
    stalling_proxy.armed.set()
    verify_source(d, a)
    refetch_held(stalling_proxy, bucket)
    d.kill()  # verify said "changed"; the new version is not here yet
    d2 = daemons(d.cache_dir, manifest=manifest, args=args)
    path = d.cache_dir / bucket / "a"
    got = Resolving(a, d.cache_dir)
    wait_for(lambda: got.done() or d2.status()["waiting"] == 1, 60, "resolve() to return or wait")
    assert path.read_bytes() != new  # the old file is on disk, the new one held at the proxy
    stalling_proxy.release.set()
    assert got.result() == new
    d2.wait_until(lambda st: st["fetched"] == 1, what="the new version published")
