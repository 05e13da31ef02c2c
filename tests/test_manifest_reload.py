"""The manifest as a real daemon reads it (issue 17.9, 17.10, 14.1): a ConfigMap-mounted manifest is
reloaded when Kubernetes swaps its ``..data`` link, a manifest rewritten in place is never installed
half-written, and ``--shard I/N`` fetches exactly this host's share (counted at the S3 endpoint), while
other shares' objects are still served on demand and reported."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from conftest import write_manifest

from s3cache import resolve
from s3cache.testing import wait_for
from s3cache.testing.faultproxy import FaultProxy


def gets(proxy: FaultProxy, bucket: str) -> dict[str, int]:
    """Object GETs at the endpoint, by key."""
    return {p.split("/", 2)[2]: n for (m, p), n in proxy.snapshot().items()
            if m == "GET" and p.startswith(f"/{bucket}/")}


def configmap_update(mount: Path, files: dict[str, str], generation: int) -> None:
    """What the kubelet's atomic writer does to a ConfigMap volume: the files go into a new timestamped
    directory, a new ``..data`` link to it is renamed over the old one, each file is a link through
    ``..data`` (made once), and the old directory is removed."""
    new = mount / f"..2024_01_01_00_00_{generation:02d}.{1000 + generation}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(new.name, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            os.symlink(f"..data/{name}", mount / name)
    if old is not None:
        shutil.rmtree(mount / old)


def test_a_configmap_manifest_is_reloaded_when_its_data_link_is_swapped(tmp_path, s3, bucket, daemons):
    for k in ("a", "b", "c"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode() * 100)
    mount = tmp_path / "config"
    mount.mkdir()
    configmap_update(mount, {"m.txt": f"s3://{bucket}/a\n"}, 1)
    d = daemons(manifest=mount / "m.txt")
    d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the first manifest's object")

    configmap_update(mount, {"m.txt": f"s3://{bucket}/a\ns3://{bucket}/b\n"}, 2)
    d.wait_until(lambda st: st["manifest_entries"] == 2 and st["objects"]["ready"] == 2, timeout=30,
                 what="the swapped ConfigMap to be reloaded")
    # The watch followed the swap to the new generation's directory: the next update is seen too.
    configmap_update(mount, {"m.txt": f"s3://{bucket}/c\n"}, 3)
    st = d.wait_until(lambda st: st["manifest_entries"] == 1 and st["objects"]["queued"] == 0
                      and st["objects"]["fetching"] == 0, timeout=30, what="the second swap to be reloaded")
    assert resolve([f"s3://{bucket}/c"], cache_dir=d.cache_dir, timeout=60)[0]
    assert st["manifest_errors"] == [] and st["manifest_reload_failures"] == 0


def test_a_manifest_rewritten_in_place_is_never_installed_half_written(tmp_path, s3, bucket, proxy, daemons):
    body = os.urandom(123456)
    s3.put_object(Bucket=bucket, Key="a", Body=body)
    s3.put_object(Bucket=bucket, Key="c", Body=b"c" * 10)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a size=123456"])
    past = time.time() - 60
    os.utime(m, (past, past))  # written long ago: start-up need not wait for it to settle
    # A settle interval long enough that the writer's pause below (waiting for the daemon to look)
    # falls inside it even on a loaded machine.
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--manifest-settle", "3"])
    d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the verified file")
    path = resolve([f"s3://{bucket}/a"], cache_dir=d.cache_dir, timeout=60)[0]
    installs = d.log().count(f"manifest {m}: ")

    with open(m, "w") as f:  # an in-place rewrite: `echo ... > m.txt`, a slow generator
        f.write(f"s3://{bucket}/a size=12")
        f.flush()
        os.fsync(f.fileno())
        # Pause until the daemon has looked at the half (it deferred it, or, as before, installed it).
        wait_for(lambda: "reading it again" in d.log() or d.log().count(f"manifest {m}: ") > installs, 60,
                 "the daemon to notice the half-written manifest")
        f.write(f"3456\ns3://{bucket}/c\n")
    st = d.wait_until(lambda st: st["manifest_entries"] == 2 and st["objects"]["ready"] == 2, timeout=60,
                      what="the whole rewritten manifest")
    log = d.log()
    assert gets(proxy, bucket) == {"a": 1, "c": 1}, "the verified file was fetched again"
    assert st["failures_total"] == 0 and "SizeMismatch" not in log and "fetching again" not in log
    assert "modified" in log and "reading it again" in log  # it did see the half, and waited
    assert Path(path).read_bytes() == body


def test_a_shard_fetches_exactly_its_share_and_serves_the_rest_on_demand(tmp_path, s3, bucket, proxy, daemons):
    keys = [f"k{i}" for i in range(7)] + ["p/x", "p/y", "p/" + "z" * 1100, "p/zz"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    # Positions count the expanded manifest: p/ stands for its three storable keys (p/x, p/y, p/zz;
    # the 1100-byte key is skipped and takes no position), so the manifest has 10 positions.
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/k{i}" for i in range(7)] + [f"s3://{bucket}/p/"])
    d = daemons(manifest=m, args=["--endpoint-url", proxy.url, "--shard", "1/3"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 3 and st["objects"]["queued"] == 0
                      and st["objects"]["fetching"] == 0, what="the share to land")
    order = [f"k{i}" for i in range(7)] + ["p/x", "p/y", "p/zz"]
    share = order[1::3]  # what tf.data's Dataset.shard(3, 1) gives worker 1 of this file list
    assert share == ["k1", "k4", "p/x"]
    assert gets(proxy, bucket) == {k: 1 for k in share}
    assert st["shard"] == "1/3" and st["manifest_total"] == 10 and st["manifest_entries"] == 3
    assert st["manifest_skipped"]["count"] == 1 and "1024" in st["manifest_skipped"]["items"][0]["reason"]
    assert st["off_share"] == {"count": 0, "recent": []}

    # A reader may read anything: another host's object is fetched on demand, and reported.
    other = f"s3://{bucket}/k2"
    assert Path(resolve([other], cache_dir=d.cache_dir, timeout=60)[0]).read_bytes() == b"k2"
    st = d.status()
    assert st["off_share"] == {"count": 1, "recent": [other]}
    assert gets(proxy, bucket) == {**{k: 1 for k in share}, "k2": 1}
    # An object in no share at all is not counted as another host's.
    s3.put_object(Bucket=bucket, Key="elsewhere", Body=b"e")
    resolve([f"s3://{bucket}/elsewhere"], cache_dir=d.cache_dir, timeout=60)
    assert d.status()["off_share"]["count"] == 1


def test_sighup_while_the_manifest_has_a_bad_line_keeps_the_watch(tmp_path, s3, bucket, daemons):
    """SIGHUP reads a manifest with a bad line: it is refused and the running watch stays, so the next
    good edit is still installed (the old watch used to be stopped before the new read failed)."""
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode() * 100)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a"])
    d = daemons(manifest=m)
    d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the first manifest's object")
    write_manifest(m, [f"s3://{bucket}/a", f"s3://{bucket}/b colour=red"])
    wait_for(lambda: d.log().count("manifest not reloaded") >= 1, 30, "the watch to refuse the bad line")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log().count("manifest not reloaded") >= 2, 30, "SIGHUP to refuse the bad line")
    write_manifest(m, [f"s3://{bucket}/a", f"s3://{bucket}/b"])
    d.wait_until(lambda st: st["manifest_entries"] == 2 and st["objects"]["ready"] == 2, timeout=30,
                 what="the corrected manifest to be installed by the watch")
