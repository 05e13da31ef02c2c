"""Denied buckets and bad credentials, against a moto server that enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_manifest

from s3cache import FetchFailed, resolve
from s3cache.testing import MotoServer

SETUP_ACTIONS = 7  # the unauthenticated actions below; every request after them is checked


@pytest.fixture(scope="module")
def iam_moto(tmp_path_factory):
    server = MotoServer(log_path=tmp_path_factory.mktemp("iam-moto") / "moto.log",
                        env={"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}).start()
    s3 = server.client()
    s3.create_bucket(Bucket="allowed")
    s3.create_bucket(Bucket="denied")
    s3.put_object(Bucket="allowed", Key="k", Body=b"allowed bytes")
    s3.put_object(Bucket="denied", Key="k", Body=b"secret bytes")
    iam = server.client("iam")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="read-allowed", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": ["arn:aws:s3:::allowed", "arn:aws:s3:::allowed/*"]}]}))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    yield server, key["AccessKeyId"], key["SecretAccessKey"]
    server.stop()


def start(tmp_path, server, daemons_for, key, secret, lines):
    from s3cache.testing import DaemonProcess

    d = DaemonProcess(tmp_path / "cache", server.url, manifest=write_manifest(tmp_path / "m.txt", lines),
                      env={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
                      log_path=tmp_path / "daemon.log")
    daemons_for.append(d)
    return d.start()


@pytest.fixture
def started():
    ds = []
    yield ds
    for d in ds:
        d.stop()


def test_a_denied_bucket_fails_its_objects_and_spares_the_others(tmp_path, iam_moto, started):
    server, key, secret = iam_moto
    d = start(tmp_path, server, started, key, secret, ["s3://denied/k", "s3://allowed/k", "s3://denied/"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 1 and st["objects"]["failed"] == 1)
    f = st["failures"][0]
    assert (f["uri"], f["code"], f["message"]) == ("s3://denied/k", "AccessDenied", "Access Denied")
    assert not f["permanent"] and f["retry_in"] is not None  # a policy fixed later: retried
    assert any("cannot list s3://denied/" in e and "AccessDenied" in e for e in st["manifest_errors"])
    # each message names its object once (issue 19: "cannot list s3://d/: s3://d/: AccessDenied")
    assert all(e.count("s3://denied/") == 1 for e in st["manifest_errors"]), st["manifest_errors"]
    assert Path(resolve("s3://allowed/k", cache_dir=d.cache_dir)).read_bytes() == b"allowed bytes"
    with pytest.raises(FetchFailed) as ei:
        resolve("s3://denied/k", cache_dir=d.cache_dir, timeout=120)
    assert ei.value.code == "AccessDenied"
    assert not (d.cache_dir / "denied" / "k").exists()


@pytest.mark.parametrize("bad", ["unknown-key", "wrong-secret"])
def test_bad_credentials_are_named_and_never_logged(tmp_path, iam_moto, started, bad):
    server, key, secret = iam_moto
    wrong_secret = "Wr0ngSecret" + os.urandom(6).hex()
    k = "AKIAUNKNOWN00000000" if bad == "unknown-key" else key
    d = start(tmp_path, server, started, k, wrong_secret, ["s3://allowed/k"])
    st = d.wait_until(lambda st: st["objects"]["failed"] == 1)
    code = st["failures"][0]["code"]
    assert code == ("InvalidAccessKeyId" if bad == "unknown-key" else "SignatureDoesNotMatch")
    with pytest.raises(FetchFailed, match=code):
        resolve("s3://allowed/k", cache_dir=d.cache_dir, timeout=120)
    assert wrong_secret not in d.log() and wrong_secret not in json.dumps(d.status())
