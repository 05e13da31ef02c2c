"""TensorFlow glue over ``resolve``: the only module that imports tensorflow (inside its functions)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

from s3cache.manifest.refs import parse_uri
from s3cache.reader.resolve import Shuffled, _iterate, resolver_for


def files(uris: Iterable[str], *, cache_dir: str | os.PathLike | None = None,
          timeout: float | None = None, shuffle_seed: int | None = None, initial_epoch: int = 0):
    """A ``tf.data.Dataset`` of local paths (tf.string), each yielded as soon as its file lands.

    Training starts after the first file, not after all of them::

        ds = tf.data.TFRecordDataset(s3cache.tf.files(uris), num_parallel_reads=tf.data.AUTOTUNE)

    With ``shuffle_seed=S`` every iteration of the dataset (each epoch under ``.repeat()`` or Keras
    ``fit``) yields the files in a new order, ``order.permutation(len(uris), S, epoch)`` with epoch
    ``initial_epoch``, ``initial_epoch + 1``, ... counted per dataset object: the same on every host and
    in every run, like ``list_files(shuffle=True, seed=S)`` reshuffling each iteration. Each epoch's
    order is announced to the daemon in one message, so it prefetches in that order and keeps the files
    needed soonest. Resuming from a checkpoint after epoch E: ``initial_epoch=E + 1``.

    Files already cached are looked up with no round trip to the daemon. Errors: tf.data wraps an
    exception raised in the generator as ``tf.errors.UnknownError`` (its message starts with the s3cache
    error's class name, the S3 error code and the URI, e.g. ``FetchFailed: s3://b/k: NoSuchKey``); the
    original exception is not re-raised, so catch ``tf.errors.UnknownError`` (or ``tf.errors.OpError``)
    around the input pipeline, or call ``s3cache.resolve`` first to get ``S3CacheError`` itself.
    """
    import tensorflow as tf

    root = None if cache_dir is None else os.fspath(cache_dir)
    refs = [parse_uri(u) for u in uris]  # a malformed URI is an UnsafeKey here, not inside tf.data
    plan = None if shuffle_seed is None else Shuffled(refs, shuffle_seed)
    epochs = itertools.count(initial_epoch)  # next() is atomic: one epoch per iteration, whatever thread

    def gen():
        epoch = next(epochs) if plan is not None else 0
        yield from _iterate(resolver_for(root), refs, timeout, plan, epoch, 0)

    return tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec(shape=(), dtype=tf.string))

