"""--shard I/N and --shard auto (issue 14.1): the same share tf.data gives worker I of N."""

import json

import pytest

from s3cache.errors import ConfigError
from s3cache.manifest.shard import WHOLE, Shard, parse_shard


def tf_config(cluster, kind, index):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})}


def addrs(n, port=2000):
    return [f"localhost:{port + i}" for i in range(n)]


@pytest.mark.parametrize("text,want", [("0/1", Shard(0, 1)), ("3/64", Shard(3, 64)), (" 63 / 64 ", Shard(63, 64)),
                                       (None, WHOLE), ("", WHOLE)])
def test_parse_i_of_n(text, want):
    assert parse_shard(text, environ={}) == want


@pytest.mark.parametrize("text,why", [("64/64", "between 0 and N-1"), ("1/0", "N must be"), ("-1/4", "must be I/N"),
                                      ("3", "must be I/N"), ("a/b", "must be I/N"), ("1/2/3", "must be I/N")])
def test_bad_shard_is_a_config_error_naming_the_form(text, why):
    with pytest.raises(ConfigError, match=why):
        parse_shard(text, environ={})


def test_share_is_position_mod_n():
    s = Shard(2, 3)
    assert [p for p in range(10) if s.owns(p)] == [2, 5, 8]
    # every position in exactly one share
    for n in (1, 2, 7):
        for p in range(50):
            assert sum(Shard(i, n).owns(p) for i in range(n)) == 1


def test_share_matches_tf_data_dataset_shard():
    tf = pytest.importorskip("tensorflow")
    files = [f"s3://b/f{i:03d}" for i in range(23)]
    for n in (1, 3, 4):
        for i in range(n):
            want = [x.decode() for x in tf.data.Dataset.from_tensor_slices(files).shard(n, i).as_numpy_iterator()]
            assert [f for p, f in enumerate(files) if Shard(i, n).owns(p)] == want


CLUSTERS = [
    {"worker": addrs(1)},
    {"worker": addrs(4)},
    {"chief": addrs(1, 3000), "worker": addrs(3)},
    {"chief": addrs(1, 3000), "worker": addrs(2), "ps": addrs(2, 4000)},
    {"chief": addrs(1, 3000)},
]


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_auto_is_tensorflows_own_worker_id_and_count(cluster):
    """Compared with TensorFlow's multi_worker_util, which MultiWorkerMirroredStrategy uses for the
    input pipeline id and count (collective_all_reduce_strategy: input_pipeline_id=_id_in_cluster)."""
    pytest.importorskip("tensorflow")
    from tensorflow.python.distribute import multi_worker_util as mwu

    for kind in ("chief", "worker"):
        for index in range(len(cluster.get(kind, []))):
            got = parse_shard("auto", environ=tf_config(cluster, kind, index))
            assert got == Shard(mwu.id_in_cluster(cluster, kind, index), mwu.worker_count(cluster, kind))


def test_auto_chief_is_worker_zero_and_workers_shift():
    c = {"chief": addrs(1, 3000), "worker": addrs(3)}
    assert parse_shard("auto", environ=tf_config(c, "chief", 0)) == Shard(0, 4)
    assert [parse_shard("auto", environ=tf_config(c, "worker", i)) for i in range(3)] == [
        Shard(1, 4), Shard(2, 4), Shard(3, 4)]


def test_auto_evaluator_gets_the_whole_manifest():
    c = {"worker": addrs(2), "evaluator": addrs(1, 5000)}
    assert parse_shard("auto", environ=tf_config(c, "evaluator", 0)) == WHOLE


@pytest.mark.parametrize("env,why", [
    ({}, "needs TF_CONFIG"),
    ({"TF_CONFIG": ""}, "needs TF_CONFIG"),
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG is not JSON"),
    ({"TF_CONFIG": "[]"}, "TF_CONFIG must be a JSON object"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": addrs(2)}})}, "no 'task' object"),
    (tf_config({"worker": addrs(2)}, "worker", 2), "lists 2 worker task"),
    (tf_config({"worker": addrs(2)}, "worker", -1), "whole number"),
    (tf_config({"worker": addrs(2), "ps": addrs(1)}, "ps", 0), "parameter server"),
    (tf_config({"worker": addrs(2)}, "master", 0), "task type must be"),
    (tf_config({"chief": addrs(2), "worker": addrs(2)}, "worker", 0), "2 chief tasks"),
    (tf_config({"worker": "localhost:1"}, "worker", 0), "must be a list"),
])
def test_auto_fails_clearly_naming_tf_config(env, why):
    with pytest.raises(ConfigError, match=why) as ei:
        parse_shard("auto", environ=env)
    assert "TF_CONFIG" in str(ei.value) or "parameter server" in str(ei.value)


def test_serve_refuses_a_bad_shard_naming_the_option(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from s3cache.cli import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    base = ["serve", "--cache-dir", str(tmp_path / "c")]
    r = CliRunner().invoke(main, [*base, "--shard", "4/4"])
    assert r.exit_code == 2 and "--shard" in r.output and "between 0 and N-1" in r.output
    r = CliRunner().invoke(main, [*base, "--shard", "auto"])
    assert r.exit_code == 2 and "needs TF_CONFIG" in r.output
    r = CliRunner().invoke(main, base, env={"S3CACHE_SHARD": "x"})
    assert r.exit_code == 2 and "must be I/N" in r.output


def test_settings_carry_the_shard(tmp_path):
    from s3cache.service.config import Settings

    assert Settings(cache_dir=tmp_path).shard == WHOLE
    assert Settings(cache_dir=tmp_path, shard=Shard(3, 64)).shard == Shard(3, 64)
    with pytest.raises(ConfigError, match="--shard"):
        Settings(cache_dir=tmp_path, shard=Shard(64, 64))
