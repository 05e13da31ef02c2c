"""Which share of the manifest this host prefetches: ``--shard I/N`` or ``--shard auto`` (from TF_CONFIG).

The rule is tf.data's: over the manifest's entries in order, position ``p`` (0-based) belongs to
share ``I`` of ``N`` when ``p % N == I``. That is what ``Dataset.shard(N, I)`` and
``AutoShardPolicy.FILE`` hand worker ``I`` of ``N`` when every worker builds the same file list in the
same order, so the host's cache holds exactly the files its own training process will read.

Positions count the *expanded* manifest: a prefix line stands for every object it lists, each its own
position, and a key written twice counts twice (to Dataset.shard a repeated file is a file like any
other).

``auto`` follows TensorFlow's MultiWorkerMirroredStrategy (tensorflow/python/distribute/
multi_worker_util.py, ``worker_count`` and ``id_in_cluster``): the chief, when the cluster has one, is
worker 0 and counts as a worker, so ``worker`` task ``i`` is data worker ``i + 1``; without a chief,
``worker`` task ``i`` is data worker ``i``. N is the number of chief and worker tasks. An ``evaluator``
runs outside the training cluster and reads its evaluation data whole, so it gets the whole manifest
(share 0/1). A ``ps`` (parameter server) reads no data: ``auto`` refuses it with a clear error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

from s3cache.errors import ConfigError

_SHARD_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
MAX_SHARDS = 1 << 20  # far beyond any fleet; keeps a typo like 0/99999999999 from looking valid


class Shard(NamedTuple):
    """Share ``index`` of ``count``. Invariant: ``0 <= index < count``."""

    index: int
    count: int

    def owns(self, position: int) -> bool:
        """Whether the manifest entry at (expanded, 0-based) ``position`` is in this share."""
        return position % self.count == self.index

    @property
    def whole(self) -> bool:
        return self.count == 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard(0, 1)


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard:
    """``"I/N"`` or ``"auto"`` (TF_CONFIG from ``environ``, default ``os.environ``); None or "" is WHOLE.

    Raises ConfigError naming the expected form (or TF_CONFIG and what is wrong with it).
    """
    if text is None or not text.strip():
        return WHOLE
    if text.strip().lower() == "auto":
        return from_tf_config(os.environ if environ is None else environ)
    m = _SHARD_RE.fullmatch(text)
    if not m:
        raise ConfigError(f"--shard must be I/N (this host's share I of N, e.g. 3/64) or auto, got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if not 1 <= count <= MAX_SHARDS:
        raise ConfigError(f"--shard {text}: N must be between 1 and {MAX_SHARDS}")
    if index >= count:
        raise ConfigError(f"--shard {text}: I must be between 0 and N-1 ({count - 1})")
    return Shard(index, count)


def from_tf_config(environ: Mapping[str, str]) -> Shard:
    """This task's share from ``TF_CONFIG``, by TensorFlow's own rule (see the module docstring)."""
    raw = environ.get("TF_CONFIG")
    if raw is None or not raw.strip():
        raise ConfigError("--shard auto needs TF_CONFIG (the JSON TensorFlow's multi-worker strategies read), "
                          "and it is not set; give the share as --shard I/N instead")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--shard auto: TF_CONFIG is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict):
        raise ConfigError("--shard auto: TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError("--shard auto: TF_CONFIG has no 'cluster' object or no 'task' object "
                          "(expected {\"cluster\": {\"worker\": [...]}, \"task\": {\"type\": \"worker\", \"index\": 0}})")
    kind = task.get("type")
    index = task.get("index", 0)
    if isinstance(index, str) and index.isdigit():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ConfigError(f"--shard auto: TF_CONFIG's task index must be a whole number, got {index!r}")

    def tasks(job: str) -> int:
        addrs = cluster.get(job, [])
        if not isinstance(addrs, (list, dict)):
            raise ConfigError(f"--shard auto: TF_CONFIG's cluster {job!r} must be a list of addresses")
        return len(addrs)

    chiefs, workers = tasks("chief"), tasks("worker")
    if chiefs > 1:
        raise ConfigError(f"--shard auto: TF_CONFIG's cluster has {chiefs} chief tasks; TensorFlow allows one")
    if kind == "evaluator":
        return WHOLE  # outside the training cluster: it reads its evaluation data whole
    if kind == "ps":
        raise ConfigError("--shard auto: this task is a parameter server ('ps' in TF_CONFIG), which reads "
                          "no training data; run s3cache without --shard, or with --shard I/N")
    if kind not in ("chief", "worker"):
        raise ConfigError(f"--shard auto: TF_CONFIG's task type must be 'chief', 'worker' or 'evaluator', "
                          f"got {kind!r}")
    count = chiefs + workers
    own = chiefs if kind == "chief" else workers
    if index >= own:
        raise ConfigError(f"--shard auto: TF_CONFIG names {kind} task {index}, but its cluster lists "
                          f"{own} {kind} task(s)")
    if kind == "chief":
        return Shard(0, count)
    return Shard(index + chiefs, count)
