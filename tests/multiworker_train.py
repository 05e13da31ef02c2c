"""One worker of a multi-worker Keras job reading through s3cache (run by tests/test_multiworker.py, one
process per worker, with TF_CONFIG set). Not a test module: it is what a user's training script does.

    python tests/multiworker_train.py SPEC.json

SPEC: {"uris": [...the same list, in the same order, on every worker...], "cache_dir": ...,
"global_batch": B, "steps": S, "out": RESULT.json}. RESULT: the task, the losses, and the URIs this
process resolved (so the test can check they are this worker's share).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import s3cache  # noqa: E402

FEATURES = {"x": tf.io.FixedLenFeature([4], tf.float32), "y": tf.io.FixedLenFeature([1], tf.float32)}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolved: list[str] = []

    # Resolve inside the function that opens the file: tf.data's FILE auto-shard inserts its shard just
    # before that function, so each worker resolves (and its daemon is asked for) only its own files.
    def local_path(uri: bytes) -> bytes:
        resolved.append(uri.decode())
        return s3cache.resolve(uri.decode(), cache_dir=spec["cache_dir"], timeout=120).encode()

    def records(uri):
        path = tf.numpy_function(local_path, [uri], tf.string, stateful=False)
        return tf.data.TFRecordDataset(tf.ensure_shape(path, []))

    def parse(record):
        ex = tf.io.parse_single_example(record, FEATURES)
        return ex["x"], ex["y"]

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    ds = (tf.data.Dataset.from_tensor_slices(spec["uris"])
          .interleave(records, cycle_length=2, num_parallel_calls=2)
          .map(parse)
          .repeat()
          .batch(spec["global_batch"])
          .with_options(options))

    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
    if spec.get("fit"):  # Keras 2 (tf-keras, TF_USE_LEGACY_KERAS=1): Keras 3's fit cannot run here
        with strategy.scope():
            model.compile(optimizer="sgd", loss="mse")
        losses = model.fit(ds, epochs=1, steps_per_epoch=spec["steps"], verbose=0).history["loss"]
    else:
        losses = train(strategy, model, ds, spec["steps"], spec["global_batch"])
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    with open(spec["out"], "w") as f:
        json.dump({"task": task, "loss": losses, "resolved": sorted(set(resolved))}, f)


def train(strategy, model, ds, steps: int, global_batch: int) -> list[float]:
    """A Keras model trained by a custom loop, as Keras 3 users must under MultiWorkerMirroredStrategy
    (its Model.fit fails there: keras-team/keras#20585). The dataset is distributed, and so auto-sharded
    by file, exactly as fit would do it."""
    with strategy.scope():
        optimizer = tf.keras.optimizers.SGD(0.01)
    batches = iter(strategy.experimental_distribute_dataset(ds))

    @tf.function
    def step(batch):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x, training=True) - y)) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    return [float(step(next(batches))) for _ in range(steps)]


if __name__ == "__main__":
    main()
