"""TensorFlow glue over ``resolve``: the only module that imports tensorflow (inside its functions)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .resolve import iter_resolve


def files(uris: Iterable[str], *, cache_dir: str | os.PathLike | None = None,
          timeout: float | None = None):
    """A ``tf.data.Dataset`` of local paths (tf.string), each yielded as soon as its file lands.

    Training starts after the first file, not after all of them::

        ds = tf.data.TFRecordDataset(s3cache.tf.files(uris), num_parallel_reads=tf.data.AUTOTUNE)

    Files already cached are looked up in batches with no round trip to the daemon. Errors surface from
    the dataset's iterator as the s3cache error raised by ``resolve`` (wrapped by tf.data).
    """
    import tensorflow as tf

    uris = list(uris)
    root = None if cache_dir is None else os.fspath(cache_dir)

    def gen():
        yield from iter_resolve(uris, cache_dir=root, timeout=timeout)

    return tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec(shape=(), dtype=tf.string))
