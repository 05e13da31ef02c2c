"""--shard's contract at its edges (issue 21, mutants mutmut found alive in shard.py): the bounds of I/N,
TF_CONFIG's task index in its accepted forms, a cluster led by its chief, and the messages that say what
to do instead. No TensorFlow here: these are the rules shard.py states, checked without it."""

import json

import pytest

from s3cache.errors import ConfigError
from s3cache.manifest.shard import MAX_SHARDS, WHOLE, Shard, parse_shard


def auto(config) -> Shard:
    return parse_shard("auto", environ={"TF_CONFIG": config if isinstance(config, str) else json.dumps(config)})


def auto_error(config) -> str:
    with pytest.raises(ConfigError) as ei:
        auto(config)
    return str(ei.value)


def test_n_may_be_as_large_as_max_shards_and_no_larger():
    assert parse_shard(f"{MAX_SHARDS - 1}/{MAX_SHARDS}", environ={}) == Shard(MAX_SHARDS - 1, MAX_SHARDS)
    with pytest.raises(ConfigError) as ei:
        parse_shard(f"0/{MAX_SHARDS + 1}", environ={})
    assert str(ei.value) == f"--shard 0/{MAX_SHARDS + 1}: N must be between 1 and {MAX_SHARDS}"


def test_an_index_past_the_last_share_names_the_last_one():
    with pytest.raises(ConfigError) as ei:
        parse_shard("64/64", environ={})
    assert str(ei.value) == "--shard 64/64: I must be between 0 and N-1 (63)"


def test_a_task_without_an_index_is_task_0():
    assert auto({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker"}}) == Shard(0, 2)


def test_a_task_index_written_as_a_string_of_digits_counts():
    assert auto({"cluster": {"worker": ["a:1", "b:1", "c:1"]}, "task": {"type": "worker", "index": "2"}}) == Shard(2, 3)


@pytest.mark.parametrize("index", [True, "one", -1, 1.0, None])
def test_a_task_index_that_is_not_a_whole_number_is_refused(index):
    msg = auto_error({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": index}})
    assert msg == f"--shard auto: TF_CONFIG's task index must be a whole number, got {index!r}"


def test_a_chief_alone_reads_everything():
    assert auto({"cluster": {"chief": ["c:1"]}, "task": {"type": "chief", "index": 0}}) == Shard(0, 1)


def test_there_is_only_chief_task_0():
    msg = auto_error({"cluster": {"chief": ["c:1"], "worker": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 1}})
    assert msg == "--shard auto: TF_CONFIG names chief task 1, but its cluster lists 1 chief task(s)"


def test_auto_without_tf_config_says_to_give_i_of_n():
    for env in ({}, {"TF_CONFIG": "  "}):
        with pytest.raises(ConfigError) as ei:
            parse_shard("auto", environ=env)
        assert str(ei.value) == ("--shard auto needs TF_CONFIG (the JSON TensorFlow's multi-worker strategies read), "
                                 "and it is not set; give the share as --shard I/N instead")


def test_tf_config_that_is_not_an_object_or_lacks_cluster_or_task():
    assert auto_error("[1, 2]") == "--shard auto: TF_CONFIG must be a JSON object with 'cluster' and 'task'"
    want = ("--shard auto: TF_CONFIG has no 'cluster' object or no 'task' object "
            "(expected {\"cluster\": {\"worker\": [...]}, \"task\": {\"type\": \"worker\", \"index\": 0}})")
    assert auto_error({"task": {"type": "worker"}}) == want
    assert auto_error({"cluster": {"worker": ["a:1"]}}) == want


def test_a_parameter_server_is_told_to_run_without_a_share():
    msg = auto_error({"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "ps", "index": 0}})
    assert msg == ("--shard auto: this task is a parameter server ('ps' in TF_CONFIG), which reads "
                   "no training data; run s3cache without --shard, or with --shard I/N")


def test_an_evaluator_reads_the_whole_manifest():
    assert auto({"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}) == WHOLE
