"""Baseline C, run in its own environment (bench/envs.py): tensorflow-io's S3 filesystem reading
``s3://`` paths directly with TFRecordDataset.

    python -m bench.baseline_tfio ENDPOINT EPOCHS URI...

Runs one epoch for each line read on stdin and prints one JSON line for it (records, seconds, ttfr).
tensorflow-io 0.37 aborts while the interpreter exits, so this leaves with os._exit once the figures
are out.
"""

from __future__ import annotations

import json
import os
import sys

from .epoch import timed_epoch


def main() -> None:
    endpoint, epochs, *uris = sys.argv[1:]
    # The endpoint needs its scheme: given host:port alone, the SDK speaks TLS whatever S3_USE_HTTPS says.
    # Without AWS_EC2_METADATA_DISABLED it first waits on the EC2 metadata service.
    os.environ.update({"S3_ENDPOINT": endpoint, "S3_USE_HTTPS": "0", "S3_VERIFY_SSL": "0",
                       "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tensorflow_io  # noqa: F401  (registers the s3:// filesystem)

    for _ in range(int(epochs)):
        if not sys.stdin.readline():  # the bench says when, so it can read the proxy's counters between
            break
        n, secs, ttfr = timed_epoch(lambda: tf.data.TFRecordDataset(uris, num_parallel_reads=tf.data.AUTOTUNE))
        print(json.dumps({"records": n, "seconds": secs, "ttfr": ttfr}), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
