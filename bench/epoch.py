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
    whatever a contender does up front (listing, downloading) counts."""
    import tensorflow as tf

    t0 = time.monotonic()
    ds = make_ds()
    first = None
    n = 0
    parse = spec()
    for b in ds.batch(batch).map(lambda x: tf.io.parse_example(x, parse), num_parallel_calls=tf.data.AUTOTUNE):
        if first is None:
            first = time.monotonic() - t0
        n += int(b["id"].shape[0])
    return n, time.monotonic() - t0, first or 0.0
