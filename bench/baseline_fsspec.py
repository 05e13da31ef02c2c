"""Baseline B, run in its own environment (bench/envs.py): fsspec's ``filecache::s3://`` over s3fs.

    python -m bench.baseline_fsspec ENDPOINT CACHE_DIR EPOCHS URI...

The usual way to put fsspec's cache under tf.data: ``fsspec.open_local`` downloads every file not yet
cached (s3fs fetches them concurrently) and returns local paths for TFRecordDataset. Runs one epoch
for each line read on stdin and prints one JSON line for it: records, seconds, ttfr.
"""

from __future__ import annotations

import json
import os
import sys

from .epoch import timed_epoch


def main() -> None:
    endpoint, cache_dir, epochs, *uris = sys.argv[1:]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import fsspec
    import tensorflow as tf

    opts = {"s3": {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                          "region_name": "us-east-1"}},
            "filecache": {"cache_storage": cache_dir}}

    def dataset():
        paths = fsspec.open_local([f"filecache::{u}" for u in uris], **opts)
        return tf.data.TFRecordDataset(paths, num_parallel_reads=tf.data.AUTOTUNE)

    for _ in range(int(epochs)):
        if not sys.stdin.readline():  # the bench says when, so it can read the proxy's counters between
            break
        n, secs, ttfr = timed_epoch(dataset)
        print(json.dumps({"records": n, "seconds": secs, "ttfr": ttfr}), flush=True)


if __name__ == "__main__":
    main()
