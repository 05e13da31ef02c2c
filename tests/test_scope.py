"""Demand scope (issue 11 item 4): a reader can make the daemon fetch, with the host's credentials, only
objects in the manifest, under one of its ``prefix/`` lines, or under ``serve --allow``; anything else is
refused at once with the rule named and no request to S3. The pure rule first, then the real daemon
behind a counting proxy, then the setting as a flag, a variable and a file key."""

from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner
from conftest import write_manifest

from s3cache import FetchFailed, OutOfScope, resolve
from s3cache.cli import main
from s3cache.errors import ConfigError
from s3cache.manifest.catalog import Catalog
from s3cache.manifest.file import load
from s3cache.manifest.parse import Listed
from s3cache.manifest.refs import parse_uri
from s3cache.manifest.scope import Scope, parse_allow, parse_allow_list
from s3cache.manifest.shard import Shard
from s3cache.sockets.control import Client
from s3cache.store.files import Layout
from s3cache.testing import DaemonProcess
from s3cache.testing.faultproxy import FaultProxy

# == the rule, pure =================================================================================


def _catalog(tmp_path, lines, listing=None, shard=None):
    """A manifest file read as the daemon reads it (prefix lines listed by ``listing``)."""
    path = write_manifest(tmp_path / "m.txt", lines)
    os.utime(path, (time.time() - 10, time.time() - 10))  # settled: not being written

    def lister(bucket, prefix):
        return [Listed(k, 1, "e") for k in (listing or {}).get((bucket, prefix), [])]

    kw = {"shard": shard} if shard else {}
    return load(str(path), lister, **kw).catalog


def allowed(scope, catalog, uri):
    return scope.allows(parse_uri(uri), catalog)


def test_in_scope_are_manifest_objects_prefix_lines_and_allow_prefixes_never_a_whole_bucket(tmp_path):
    cat = _catalog(tmp_path, ["s3://data/train/0", "s3://data/train/1", "s3://data/val/"],
                   listing={("data", "val/"): ["val/0"]})
    scope = Scope(["s3://extra/shared/"], has_manifest=True)
    assert allowed(scope, cat, "s3://data/train/0")
    assert allowed(scope, cat, "s3://data/val/0")
    assert allowed(scope, cat, "s3://data/val/uploaded-after-the-listing")  # the prefix line, not its listing
    assert allowed(scope, cat, "s3://extra/shared/deep/x")
    # Two files of a bucket do not open the bucket, nor their directory.
    assert not allowed(scope, cat, "s3://data/train/2")
    assert not allowed(scope, cat, "s3://data/secrets/key")
    assert not allowed(scope, cat, "s3://extra/other")
    assert not allowed(scope, cat, "s3://extra/shared")  # the prefix is "shared/": the key "shared" is not under it
    assert not allowed(scope, cat, "s3://data/val")
    with pytest.raises(OutOfScope) as ei:
        scope.check(parse_uri("s3://data/secrets/key"), cat)
    assert isinstance(ei.value, FetchFailed) and ei.value.code == "OutOfScope"
    assert "in the manifest, under one of its prefix/ lines, or under --allow s3://extra/shared/" in str(ei.value)


def test_every_share_of_a_sharded_manifest_is_in_scope(tmp_path):
    cat = _catalog(tmp_path, [f"s3://data/k{i}" for i in range(8)], shard=Shard(1, 4))
    assert len(cat) == 2
    scope = Scope(has_manifest=True)
    assert all(allowed(scope, cat, f"s3://data/k{i}") for i in range(8))  # another host's objects too
    assert not allowed(scope, cat, "s3://data/k8")


def test_without_a_manifest_only_allow_is_in_scope_and_with_neither_nothing_is(tmp_path):
    empty = Catalog()
    nothing = Scope()
    assert not allowed(nothing, empty, "s3://data/k")
    assert "no manifest and no --allow" in nothing.warning()
    assert "under an --allow prefix (none given)" in nothing.rule() and "manifest, under" not in nothing.rule()
    bucket = Scope(["s3://data"])
    assert allowed(bucket, empty, "s3://data/any/key") and not allowed(bucket, empty, "s3://data2/k")
    assert bucket.warning() is None
    everything = Scope(["s3://"])
    assert allowed(everything, empty, "s3://anything/at/all")
    assert "any object" in everything.warning()


@pytest.mark.parametrize("bad, problem", [
    ("s3://data/train", "must end with '/'"),
    ("https://data/train/", "not an s3:// prefix"),
    ("s3://Data_Bucket/", "invalid bucket name"),
    ("s3:///x/", "invalid bucket name"),
])
def test_a_malformed_allow_prefix_is_a_config_error_naming_it(bad, problem):
    with pytest.raises(ConfigError, match=problem) as ei:
        parse_allow(bad)
    assert repr(bad) in str(ei.value)


def test_allow_lists_are_split_canonical_and_deduplicated():
    assert parse_allow_list("s3://a-b/x/, s3://c-d  s3://a-b/x/") == ("s3://a-b/x/", "s3://c-d/")
    assert parse_allow_list(["s3://a-b/x y/"]) == ("s3://a-b/x y/",)  # a TOML list item is one prefix
    assert parse_allow_list("") == ()
    with pytest.raises(ConfigError):
        parse_allow_list(3)


# == the real daemon ================================================================================


def _client(d) -> Client:
    return Client(Layout(str(d.cache_dir.absolute())).control_socket, str(d.cache_dir), timeout=120)


def _requests(proxy, prefix: str) -> int:
    """Every request (GET, HEAD, listing) whose path starts with ``prefix``."""
    return sum(n for (_, p), n in proxy.snapshot().items() if p.startswith(prefix))


def _daemon(tmp_path, url, manifest=None, args=(), env=None, name="cache") -> DaemonProcess:
    # S3CACHE_ALLOW empty: the default scope, whatever the environment of the test run says.
    return DaemonProcess(tmp_path / name, url, manifest=manifest, args=list(args),
                         env={"S3CACHE_ALLOW": "", **(env or {})}, log_path=tmp_path / f"{name}.log")


def test_an_out_of_scope_uri_is_refused_at_once_without_a_request_and_in_scope_ones_are_served(tmp_path, moto, s3,
                                                                                              bucket):
    for key in ("listed/a", "listed/b", "pre/0", "secret/x", "allowed/y", "secret/h", "allowed/h"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode() * 100)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/listed/a", f"s3://{bucket}/pre/"])
    with FaultProxy(moto.port) as proxy:
        d = _daemon(tmp_path, proxy.url, manifest=m, args=["--allow", f"s3://{bucket}/allowed/"]).start()
        try:
            d.wait_until(lambda st: st["objects"]["ready"] == 2, what="the manifest's two objects")
            s3.put_object(Bucket=bucket, Key="pre/late", Body=b"uploaded after the listing")
            cache = d.cache_dir
            for key in ("secret/x", "listed/b"):  # another key; a sibling of a manifest entry
                with pytest.raises(OutOfScope) as ei:
                    resolve(f"s3://{bucket}/{key}", cache_dir=cache, timeout=120)
                assert ei.value.code == "OutOfScope"
                assert "in the manifest, under one of its prefix/ lines, or under --allow " \
                       f"s3://{bucket}/allowed/" in str(ei.value)
            r = CliRunner().invoke(main, ["resolve", "--cache-dir", str(cache), f"s3://{bucket}/secret/x"])
            assert r.exit_code == 1 and "OutOfScope: not in the daemon's demand scope" in r.stderr, r.output
            # In scope: an --allow'd object, and one under a prefix line uploaded after it was listed.
            assert open(resolve(f"s3://{bucket}/allowed/y", cache_dir=cache, timeout=120), "rb").read() == \
                b"allowed/y" * 100
            assert open(resolve(f"s3://{bucket}/pre/late", cache_dir=cache, timeout=120), "rb").read() == \
                b"uploaded after the listing"
            # Ahead hints: the out-of-scope one is dropped, the in-scope one (same want) is fetched.
            with _client(d) as c:
                c.request({"op": "want", "reader": "r", "uris": [],
                           "ahead": [f"s3://{bucket}/secret/h", f"s3://{bucket}/allowed/h"]})
            st = d.wait_until(lambda st: st["objects"]["ready"] == 5, what="the in-scope hint fetched")
            assert st["hints"]["accepted"] == 1
            assert st["out_of_scope"] == {"wants": 3, "hints": 1}  # two resolves and the CLI's; one hint
            # Not one request for anything out of scope; the in-scope ones did reach S3.
            assert _requests(proxy, f"/{bucket}/secret/") == 0
            assert _requests(proxy, f"/{bucket}/listed/b") == 0
            assert proxy.gets(f"/{bucket}/allowed/") >= 2 and proxy.gets(f"/{bucket}/pre/late") >= 1
            assert not (cache / bucket / "secret").exists()
        finally:
            d.stop()


def _swap(path, lines):
    tmp = path.with_suffix(".new")
    write_manifest(tmp, lines)
    os.replace(tmp, path)


def test_the_scope_follows_manifest_reloads(tmp_path, moto, s3, bucket):
    for key in ("a/0", "c/0", "c/1"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode() * 10)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a/0"])
    with FaultProxy(moto.port) as proxy:
        d = _daemon(tmp_path, proxy.url, manifest=m).start()
        try:
            cache = d.cache_dir
            d.wait_until(lambda st: st["objects"]["ready"] == 1)
            with pytest.raises(OutOfScope):
                resolve(f"s3://{bucket}/c/0", cache_dir=cache, timeout=120)
            assert _requests(proxy, f"/{bucket}/c/") == 0
            # Widened: a prefix line for c/ (listing c/ shows up at the proxy, as a listing, not a GET).
            _swap(m, [f"s3://{bucket}/a/0", f"s3://{bucket}/c/"])
            d.wait_until(lambda st: st["manifest_entries"] == 3, what="the wider manifest installed")
            assert open(resolve(f"s3://{bucket}/c/0", cache_dir=cache, timeout=120), "rb").read() == b"c/0" * 10
            d.wait_until(lambda st: st["objects"]["ready"] == 3, what="c/ prefetched")
            # Narrowed again: c/ is out of scope for fetching (c/2, uploaded since, is not cached).
            s3.put_object(Bucket=bucket, Key="c/2", Body=b"too late")
            _swap(m, [f"s3://{bucket}/a/0"])
            d.wait_until(lambda st: st["manifest_entries"] == 1, what="the narrower manifest installed")
            with pytest.raises(OutOfScope):
                resolve(f"s3://{bucket}/c/2", cache_dir=cache, timeout=120)
            assert _requests(proxy, f"/{bucket}/c/2") == 0
        finally:
            d.stop()


def test_without_a_manifest_nothing_is_fetched_unless_allowed(tmp_path, moto, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"on demand")
    with FaultProxy(moto.port) as proxy:
        d = _daemon(tmp_path, proxy.url).start()
        try:
            with pytest.raises(OutOfScope, match="under an --allow prefix \\(none given\\)"):
                resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120)
            assert proxy.total() == 0
            assert "no manifest and no --allow" in d.log()
        finally:
            d.stop()
        d = _daemon(tmp_path, proxy.url, env={"S3CACHE_ALLOW": f"s3://{bucket}/"}, name="cache2").start()
        try:
            assert open(resolve(f"s3://{bucket}/k", cache_dir=d.cache_dir, timeout=120), "rb").read() == b"on demand"
            assert "no manifest and no --allow" not in d.log()
        finally:
            d.stop()


# == the setting ====================================================================================


def _shown(args, env=None):
    r = CliRunner().invoke(main, ["config", "show", "--json", *args], env=env)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)["allow"]


def test_allow_is_a_repeatable_flag_a_list_in_the_environment_and_the_file(tmp_path):
    assert _shown(["--allow", "s3://a-b/x/", "--allow", "s3://c-d"], env={"S3CACHE_ALLOW": ""}) == \
        {"value": "s3://a-b/x/ s3://c-d/", "source": "flag"}
    assert _shown([], env={"S3CACHE_ALLOW": "s3://a-b/x/,s3://c-d/"}) == \
        {"value": "s3://a-b/x/ s3://c-d/", "source": "env:S3CACHE_ALLOW"}
    f = tmp_path / "c.toml"
    f.write_text('allow = ["s3://a-b/x/", "s3://c-d/"]\n')
    assert _shown(["--config", str(f)], env={"S3CACHE_ALLOW": ""})["value"] == "s3://a-b/x/ s3://c-d/"
    r = CliRunner().invoke(main, ["config", "show", "--allow", "s3://a-b/x"], env={"S3CACHE_ALLOW": ""})
    assert r.exit_code == 2 and "a prefix must end with '/': 's3://a-b/x'" in r.output


def test_a_want_made_while_its_manifest_edit_is_on_the_way_waits_for_it(tmp_path, moto, s3, bucket):
    """A job appends its object to the manifest and resolves it at once: it is served as soon as the
    edit is installed, not refused for the moment between (issue 11 item 4). An object the edit does
    not add, or an edit that does not parse, is still refused, once that is known, with no request."""
    for key in ("a/0", "b/0", "c/0", "d/0"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode() * 10)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a/0"])
    with FaultProxy(moto.port) as proxy:
        # A long settle: the resolves below certainly come while the edit is not installed yet.
        d = _daemon(tmp_path, proxy.url, manifest=m, args=["--manifest-settle", "2"]).start()
        try:
            cache = d.cache_dir
            d.wait_until(lambda st: st["objects"]["ready"] == 1)
            write_manifest(m, [f"s3://{bucket}/a/0", f"s3://{bucket}/b/0"])  # in place, as a job would
            assert d.status()["manifest_entries"] == 1  # not installed yet
            assert open(resolve(f"s3://{bucket}/b/0", cache_dir=cache, timeout=120), "rb").read() == b"b/0" * 10
            assert d.status()["out_of_scope"]["wants"] == 0
            # An edit that adds another object: c/0 waits for it, then is refused.
            write_manifest(m, [f"s3://{bucket}/a/0", f"s3://{bucket}/b/0", f"s3://{bucket}/d/0"])
            with pytest.raises(OutOfScope):
                resolve(f"s3://{bucket}/c/0", cache_dir=cache, timeout=120)
            assert d.status()["manifest_entries"] == 3  # refused after the edit was installed
            # An edit that does not parse: refused once the reload has rejected it.
            write_manifest(m, [f"s3://{bucket}/a/0", f"s3://{bucket}/c/0 size=lots"])
            with pytest.raises(OutOfScope):
                resolve(f"s3://{bucket}/c/0", cache_dir=cache, timeout=120)
            assert "m.txt:2" in d.log() and d.status()["manifest_entries"] == 3
            assert _requests(proxy, f"/{bucket}/c/") == 0
        finally:
            d.stop()
