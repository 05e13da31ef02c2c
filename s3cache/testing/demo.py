"""``s3cache demo``: the whole path on an embedded S3, checked record by record.

moto's S3 server on a free port, a TFRecord dataset of tf.train.Example records uploaded to it, a
manifest with SHA-256 checksums, ``s3cache serve`` as a subprocess, and TensorFlow reading every record
back through ``s3cache.tf.files`` (streaming) and ``resolve`` (warm), then a few steps of a tiny Keras
model. Exits 0 only if every record read back equals what was written.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from s3cache.service.config import human_size

from . import DaemonProcess, MotoServer

FEATURES = 16


def make_shards(out_dir: Path, shards: int, records: int, seed: int = 0) -> dict[int, tuple[list[float], int]]:
    """Write ``shards`` TFRecord files of tf.train.Example; returns id -> (features, label)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    expected: dict[int, tuple[list[float], int]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tf.io.TFRecordWriter(str(out_dir / f"shard-{s:05d}.tfrecord")) as w:
            for r in range(records):
                rid = s * records + r
                x = rng.standard_normal(FEATURES).astype("float32").tolist()
                label = int(sum(x) > 0)
                expected[rid] = (x, label)
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[rid])),
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                }))
                w.write(ex.SerializeToString())
    return expected


def parse_fn():
    """A function parsing one serialized Example (or a batch of them) into id, x, label."""
    import tensorflow as tf

    spec = {
        "id": tf.io.FixedLenFeature([], tf.int64),
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }
    return lambda rec: tf.io.parse_example(rec, spec)


def collect(ds, batch: int = 1024, first: list[float] | None = None) -> dict[int, tuple[list[float], int]]:
    """Every record of a TFRecord dataset as id -> (features, label), parsed in batches.

    ``first``, if given, receives the monotonic time at which the first batch arrived.
    """
    parse = parse_fn()
    out: dict[int, tuple[list[float], int]] = {}
    for b in ds.batch(batch).map(parse):
        if first is not None and not first:
            first.append(time.monotonic())
        for rid, x, label in zip(b["id"].numpy().tolist(), b["x"].numpy().tolist(), b["label"].numpy().tolist()):
            out[rid] = (x, label)
    return out


def run_demo(workdir: Path | None = None, shards: int = 16, records: int = 4096,
             out: Callable[[str], None] = print, images: int = 0) -> int:
    """The demo; ``images`` > 0 also runs the image pipeline (JPEG objects -> decode_jpeg)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="s3cache-demo-") as tmp:
            return _run(Path(tmp), shards, records, out, images)
    workdir.mkdir(parents=True, exist_ok=True)
    return _run(workdir, shards, records, out, images)


def _images(s3, cache: Path, manifest: Path, count: int, out: Callable[[str], None]) -> bool:
    """Upload ``count`` small JPEGs, append them to the running daemon's manifest, read them back
    through s3cache.tf.files -> read_file -> decode_jpeg with labels in step; True if all check out."""
    import tensorflow as tf

    from s3cache import tf as s3tf

    uris, labels, shade = [], [], []
    for i in range(count):
        v = (i * 37) % 256
        img = tf.cast(tf.fill([32, 32, 3], v), tf.uint8)
        key = f"images/class-{i % 10}/{i:06d}.jpg"
        s3.put_object(Bucket="demo", Key=key, Body=tf.io.encode_jpeg(img, quality=95).numpy())
        uris.append(f"s3://demo/{key}")
        labels.append(i % 10)
        shade.append(v)
    with open(manifest, "a") as f:
        f.write("s3://demo/images/\n")  # the running daemon picks the edit up
    t0 = time.monotonic()
    files = s3tf.files(uris, cache_dir=cache, timeout=120)
    pixels = files.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE).map(
        tf.io.decode_jpeg, num_parallel_calls=tf.data.AUTOTUNE)
    ds = tf.data.Dataset.zip((pixels, tf.data.Dataset.from_tensor_slices(labels))).batch(64)
    got_labels, bad = [], 0
    i = 0
    for imgs, labs in ds:
        means = tf.reduce_mean(tf.cast(imgs, tf.float32), axis=[1, 2, 3]).numpy()
        for mean, lab in zip(means, labs.numpy().tolist()):
            bad += abs(mean - shade[i]) > 3  # JPEG is lossy, barely, for a flat image
            got_labels.append(lab)
            i += 1
    dt = time.monotonic() - t0
    ok = got_labels == labels and bad == 0
    out(f"images (s3cache.tf.files -> read_file -> decode_jpeg): {len(got_labels)} JPEGs in {dt:.2f}s, "
        f"{len(got_labels) / dt:,.0f} images/s; labels in step: {got_labels == labels}; wrong pixels: {bad}")
    return ok


def _run(work: Path, shards: int, records: int, out: Callable[[str], None], images: int = 0) -> int:
    import tensorflow as tf

    from s3cache import resolve
    from s3cache import tf as s3tf

    out(f"s3cache demo in {work}")
    src = work / "src"
    expected = make_shards(src, shards, records)
    files = sorted(src.iterdir())
    total_bytes = sum(f.stat().st_size for f in files)

    with MotoServer(log_path=work / "moto.log") as moto:
        s3 = moto.client()
        s3.create_bucket(Bucket="demo")
        lines = []
        for f in files:
            data = f.read_bytes()
            s3.put_object(Bucket="demo", Key=f"train/{f.name}", Body=data)
            lines.append(f"s3://demo/train/{f.name} size={len(data)} sha256={hashlib.sha256(data).hexdigest()}")
        manifest = work / "manifest.txt"
        manifest.write_text("# the demo's dataset, in training order\n" + "\n".join(lines) + "\n")
        uris = [ln.split()[0] for ln in lines]
        out(f"uploaded {len(files)} shards, {shards * records} records, {human_size(total_bytes)} "
            f"to {moto.url} (moto)")

        cache = work / "cache"
        t_start = time.monotonic()
        # --allow: the image part adds a prefix line to the manifest and reads at once, before the daemon
        # has installed the edit; the operator allows the demo's bucket (README, demand scope).
        with DaemonProcess(cache, moto.url, manifest=manifest, args=["--max-size", "1G", "--allow", "s3://demo/"],
                           log_path=work / "daemon.log") as daemon:
            # Epoch 1, streaming: TensorFlow starts on the first shard while the rest are still landing.
            ds = tf.data.TFRecordDataset(s3tf.files(uris, cache_dir=cache), num_parallel_reads=4)
            first: list[float] = []
            seen = collect(ds, first=first)
            first_record = first[0] - t_start
            cold = time.monotonic() - t_start

            # Epoch 2, warm: the plain form, resolve() over the list, reads local files only.
            t1 = time.monotonic()
            paths = resolve(uris, cache_dir=cache)
            warm_seen = collect(tf.data.TFRecordDataset(paths))
            warm = time.monotonic() - t1
            warm_records = len(warm_seen)
            mismatches = sum(1 for rid, v in expected.items() if warm_seen.get(rid) != v)

            # A few steps of a tiny Keras model on the cached records.
            train = (tf.data.TFRecordDataset(paths).batch(64).map(parse_fn())
                     .map(lambda e: (e["x"], e["label"])))
            model = tf.keras.Sequential([tf.keras.Input((FEATURES,)), tf.keras.layers.Dense(8, activation="relu"),
                                         tf.keras.layers.Dense(1, activation="sigmoid")])
            model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
            # shuffle=False: a tf.data.Dataset is shuffled by the pipeline; Keras's default (True) would
            # only print a warning that it ignores it.
            hist = model.fit(train.repeat(), epochs=2, steps_per_epoch=max(1, len(expected) // 64), verbose=0,
                             shuffle=False)
            images_ok = _images(s3, cache, manifest, images, out) if images else True
            st = daemon.status()

    mismatches += sum(1 for rid, v in expected.items() if seen.get(rid) != v)
    missing = len(expected) - len(seen)
    ok = mismatches == 0 and missing == 0 and warm_records == len(expected) and images_ok
    out(f"cold epoch (daemon start + streaming via s3cache.tf.files): {len(seen)} records in {cold:.2f}s, "
        f"{len(seen) / cold:,.0f} records/s, {human_size(total_bytes / cold)}/s; "
        f"first batch of 1024 records {first_record:.2f}s after starting the daemon")
    out(f"warm epoch (resolve + TFRecordDataset): {warm_records} records in {warm:.2f}s, "
        f"{warm_records / warm:,.0f} records/s, {human_size(total_bytes / warm)}/s")
    out(f"cache: {st['objects']['ready']} files, {human_size(st['bytes']['ready'])} of "
        f"{human_size(st['bytes']['max'])}; verified by {st['verified_by']}; "
        f"{st['requests']} S3 requests, {st['hits']} cache hits")
    out(f"keras: 2 epochs, final loss {hist.history['loss'][-1]:.3f}, accuracy {hist.history['accuracy'][-1]:.3f}")
    out(f"records checked: {len(expected)}; missing {missing}; mismatched {mismatches}")
    out("demo OK: every record read back equals what was written" if ok else "demo FAILED")
    return 0 if ok else 1
