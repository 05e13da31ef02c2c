"""One timed epoch of a TFRecord input pipeline, the same for every contender.

Imports only TensorFlow, so the baselines that run in environments of their own (bench/envs.py) time
their epochs with exactly this code.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def spec() -> dict:
    import tensorflow as tf

    return {"id": tf.io.FixedLenFeature([], tf.int64), "payload": tf.io.FixedLenFeature([], tf.string)}


def timed_epoch(make_ds: Callable[[], object], batch: int = 64) -> tuple[int, float, float]:
    """(records, seconds, time to first record) for one pass over a dataset of serialized Examples,
    parsed in batches as a training input pipeline would. The clock starts before ``make_ds()``, so
    whatever a contender does up front (listing, downloading) counts.

    The first record is timed inside the pipeline (tf.timestamp as each record leaves the reader), not
    at the first batch: with parallel interleave a batch mixes records of several files, so the first
    batch would time the slowest of the first few files instead of the first record.
    """
    import tensorflow as tf

    t0 = time.time()
    ds = make_ds()
    n = 0
    first = float("inf")
    parse = spec()
    stamped = ds.map(lambda x: (x, tf.timestamp()))
    for b in stamped.batch(batch).map(lambda x, t: (tf.io.parse_example(x, parse), tf.reduce_min(t)),
                                      num_parallel_calls=tf.data.AUTOTUNE):
        records, t = b
        first = min(first, float(t))
        n += int(records["id"].shape[0])
    return n, time.time() - t0, (first - t0) if n else 0.0
