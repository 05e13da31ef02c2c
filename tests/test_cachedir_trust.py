"""A cache dir the daemon did not create, other users on the host, and the modes they meet (issues 18.1,
18.2, 11.4). Real users made for the test (``local_user``), real files, the real daemon where the
claim is about it; skipped where users cannot be made (not root)."""

from __future__ import annotations

import fcntl
import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from s3cache.errors import CacheLocked, UntrustedCacheDir
from s3cache.manifest.refs import ObjectRef
from s3cache.store.files import Store


@pytest.fixture
def shared_tmp():
    """A sticky world-writable dir like /tmp (pytest's tmp_path is 0700: other users cannot reach it)."""
    d = Path(tempfile.mkdtemp(prefix="s3ct-shared-", dir="/tmp"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def victim(tmp_path):
    """What an attacker would like a root daemon to empty, chmod or overwrite."""
    d = tmp_path / "victim-dir"
    d.mkdir(mode=0o755)
    (d / "precious").write_text("precious")
    f = tmp_path / "victim-file"
    f.write_text("root:x:0:0::/root:/bin/sh\n")
    os.chmod(f, 0o644)

    def untouched() -> None:
        assert os.listdir(d) == ["precious"] and (d / "precious").read_text() == "precious"
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
        assert f.read_text() == "root:x:0:0::/root:/bin/sh\n" and stat.S_IMODE(os.stat(f).st_mode) == 0o644

    return d, f, untouched


def as_user(user, script: str) -> None:
    r = user.run(["sh", "-c", script])
    assert r.returncode == 0, r.stderr


def test_a_cache_dir_planted_by_another_user_is_refused_and_nothing_is_touched(local_user, shared_tmp, victim):
    mallory = local_user()
    vdir, vfile, untouched = victim
    cache = shared_tmp / "cache"
    as_user(mallory, f"mkdir -p {cache}/.s3cache && chmod 755 {cache} {cache}/.s3cache && "
                     f"ln -s {vdir} {cache}/.s3cache/tmp && ln -s {vfile} {cache}/.s3cache/lock")
    with pytest.raises(UntrustedCacheDir) as ei:
        Store(str(cache)).open()
    msg = str(ei.value)
    assert f"cache dir {cache} is owned by {mallory.name}" in msg and "remove it" in msg
    untouched()


def test_the_daemon_refuses_a_planted_cache_dir_and_empties_nothing(local_user, shared_tmp, victim, daemons):
    mallory = local_user()
    vdir, vfile, untouched = victim
    cache = shared_tmp / "cache"
    as_user(mallory, f"mkdir -p {cache}/.s3cache && chmod 755 {cache} {cache}/.s3cache && "
                     f"ln -s {vdir} {cache}/.s3cache/tmp && ln -s {vfile} {cache}/.s3cache/lock")
    d = daemons(cache, wait=False)
    assert d.proc.wait(120) != 0
    d.proc = None
    assert f"cache dir {cache} is owned by {mallory.name}" in d.log()
    assert "Traceback" not in d.log()
    untouched()


def test_a_private_dir_planted_in_a_writable_cache_root_is_refused(local_user, shared_tmp, victim):
    mallory = local_user()
    vdir, vfile, untouched = victim
    cache = shared_tmp / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)  # root's, but anyone may add names in it
    as_user(mallory, f"mkdir {cache}/.s3cache && ln -s {vdir} {cache}/.s3cache/tmp")
    with pytest.raises(UntrustedCacheDir, match=rf"cache dir {cache} is writable by group and others \(mode 0777\)"):
        Store(str(cache)).open()
    os.chmod(cache, 0o755)
    with pytest.raises(UntrustedCacheDir, match=rf"private dir {cache}/.s3cache is owned by {mallory.name}"):
        Store(str(cache)).open()
    untouched()


def test_a_cache_root_that_is_another_users_symlink_is_refused(local_user, shared_tmp, tmp_path):
    mallory = local_user()
    target = tmp_path / "root-owned"  # root's and 0755: it passes every check but who placed the link
    target.mkdir(mode=0o755)
    home = shared_tmp / "mallory"
    as_user(mallory, f"mkdir {home} && ln -s {target} {home}/cache")
    with pytest.raises(UntrustedCacheDir, match=rf"{home}/cache is a symlink owned by {mallory.name}"):
        Store(str(home / "cache")).open()
    assert os.listdir(target) == []
    # the operator's own symlink is fine
    os.symlink(target, tmp_path / "mine")
    s = Store(str(tmp_path / "mine"))
    s.open()
    s.close()


@pytest.mark.parametrize("name", ["tmp", "lock", "lease.lock", "quarantine", "index"])
def test_symlinks_inside_a_trusted_private_dir_are_never_followed(tmp_path, victim, name):
    vdir, vfile, untouched = victim
    cache = tmp_path / "cache"
    (cache / ".s3cache").mkdir(parents=True)
    os.symlink(vfile if "lock" in name else vdir, cache / ".s3cache" / name)
    with pytest.raises(UntrustedCacheDir, match=rf"{cache}/.s3cache/{name} is .*symlink"):
        Store(str(cache)).open()
    untouched()


# == who can reach the lock files (18.1) ==============================================================


def _group() -> str:
    return "s3ctg" + uuid.uuid4().hex[:6]


def _flock(user, path: Path, mode: str) -> subprocess.CompletedProcess:
    return user.run(["flock", mode, "-n", str(path), "true"], timeout=60)


def test_users_outside_the_group_cannot_open_the_lock_files_and_members_only_the_lease_lock(
        local_user, shared_tmp, daemons):
    g = _group()
    member = local_user(groups=(g,))
    outsider = local_user()
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, 0, grp.getgrnam(g).gr_gid)
    d = daemons(cache)
    priv = cache / ".s3cache"
    for name in ("lock", "lease.lock"):
        r = _flock(outsider, priv / name, "-x")
        assert r.returncode != 0 and "Permission denied" in r.stderr, (name, r.stderr)
    assert "Permission denied" in _flock(member, priv / "lock", "-x").stderr  # the daemon's alone
    r = _flock(member, priv / "lease.lock", "-s")  # what every reader's resolve() does
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(priv).st_mode) & 0o777 == 0o750
    assert stat.S_IMODE(os.stat(priv / "lock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(priv / "lease.lock").st_mode) == 0o640
    assert os.stat(priv / "lease.lock").st_gid == grp.getgrnam(g).gr_gid
    assert d.status()["pid"] == d.proc.pid


def test_a_stale_pid_never_blocks_a_start_and_a_foreign_holder_is_not_called_the_daemon(tmp_path):
    cache = tmp_path / "cache"
    first = Store(str(cache))
    first.open()
    first.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache / ".s3cache" / "lock").write_text(f"{dead.pid}\n")
    s = Store(str(cache))
    s.open()  # flock free, pid dead: the start goes ahead and records itself
    assert (cache / ".s3cache" / "lock").read_text() == f"{os.getpid()}\n"
    s.close()
    (cache / ".s3cache" / "lock").write_text(f"{dead.pid}\n")
    fd = os.open(cache / ".s3cache" / "lock", os.O_RDONLY)  # something else holds the lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(CacheLocked) as ei:
            Store(str(cache)).open()
        assert "already served" not in str(ei.value)
        assert f"locked by another process (the pid {dead.pid} recorded in its lock file is not running" \
            in str(ei.value)
        assert ei.value.pid is None
    finally:
        os.close(fd)


# == modes of cached files (11.4) =====================================================================


def _publish(store: Store, key: str, data: bytes) -> Path:
    fd, tmp = store.new_temp("t")
    os.write(fd, data)
    os.close(fd)
    rel = store.plan(ObjectRef("bucket", key))
    assert store.publish([(tmp, rel)]) == [None]
    return Path(store.layout.root) / rel


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_cached_files_are_readable_by_the_group_only_whatever_the_umask(local_user, shared_tmp, umask):
    g = _group()
    member = local_user(groups=(g,))
    outsider = local_user()
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, 0, grp.getgrnam(g).gr_gid)
    old = os.umask(umask)
    try:
        store = Store(str(cache))
        store.open()
        path = _publish(store, "train/shard-0", b"group only")
    finally:
        os.umask(old)
    try:
        r = outsider.run(["cat", str(path)])
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = member.run(["cat", str(path)])
        assert r.returncode == 0 and r.stdout == "group only", r.stderr
        gid = grp.getgrnam(g).gr_gid
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and os.stat(path).st_gid == gid
        for d in (cache / "bucket", cache / "bucket/train"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o750 and os.stat(d).st_gid == gid
    finally:
        store.close()


def test_world_readable_is_an_option(local_user, shared_tmp):
    outsider = local_user()
    cache = shared_tmp / "cache"
    store = Store(str(cache), world_readable=True)
    store.open()
    try:
        path = _publish(store, "pub/x", b"for everyone")
        r = outsider.run(["cat", str(path)])
        assert r.returncode == 0 and r.stdout == "for everyone", r.stderr
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        r = outsider.run(["ls", str(cache / ".s3cache")])  # private state stays private
        assert r.returncode != 0 and "Permission denied" in r.stderr
    finally:
        store.close()


def test_an_older_cache_with_open_directories_is_closed_at_open(local_user, shared_tmp):
    outsider = local_user()
    cache = shared_tmp / "cache"
    (cache / "bucket/old").mkdir(parents=True)
    os.chmod(cache, 0o755)
    for d in (cache / "bucket", cache / "bucket/old"):
        os.chmod(d, 0o755)
    (cache / "bucket/old/f").write_text("from 0.1")
    os.chmod(cache / "bucket/old/f", 0o644)  # what older versions published
    store = Store(str(cache))
    store.open()
    store.close()
    r = outsider.run(["cat", str(cache / "bucket/old/f")])
    assert r.returncode != 0 and "Permission denied" in r.stderr
