"""Issue 14.2 on the tf.data service: a dispatcher and two workers in this process, the dataset's files
resolved through the host's cache (one daemon) inside the function that opens them, with dynamic
sharding: every record is read exactly once across the workers, and each file is fetched from S3 once.
The body of the test is what a user writes."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import write_manifest

from s3cache.testing.faultproxy import FaultProxy

tf = pytest.importorskip("tensorflow")
import s3cache  # noqa: E402

FILES, RECORDS = 6, 10


@pytest.fixture
def service():
    """A tf.data service in this process: a dispatcher and two workers, stopped at the end."""
    from tensorflow.data.experimental import service as tfs

    dispatcher = tfs.DispatchServer(tfs.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    workers = [tfs.WorkerServer(tfs.WorkerConfig(dispatcher_address=address, port=0)) for _ in range(2)]
    yield dispatcher.target, workers
    for w in workers:
        w._stop()
    dispatcher._stop()


def test_the_tfdata_service_reads_the_host_cache(tmp_path, moto, s3, bucket, daemons, service):
    service, workers = service
    expected = Counter()
    uris = []
    for i in range(FILES):
        path = tmp_path / f"part-{i}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as w:
            for j in range(RECORDS):
                w.write(f"{i}-{j}".encode())
                expected[f"{i}-{j}"] += 1
        s3.put_object(Bucket=bucket, Key=f"tfr/{path.name}", Body=path.read_bytes())
        uris.append(f"s3://{bucket}/tfr/{path.name}")
    with FaultProxy(moto.port) as proxy:
        d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris), args=["--endpoint-url", proxy.url])
        cache_dir = str(d.cache_dir)

        # -- what a user writes ------------------------------------------------------------------------
        def local_path(uri: bytes) -> bytes:  # runs in the tf.data service worker, on the cache's host
            return s3cache.resolve(uri.decode(), cache_dir=cache_dir, timeout=120).encode()

        def records(uri):
            path = tf.numpy_function(local_path, [uri], tf.string, stateful=False)
            return tf.data.TFRecordDataset(tf.ensure_shape(path, []))

        ds = tf.data.Dataset.from_tensor_slices(uris).interleave(records, cycle_length=2)
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=service,
            job_name="s3cache-test"))
        got = Counter(r.decode() for r in ds.as_numpy_iterator())
        # ----------------------------------------------------------------------------------------------

        assert got == expected  # every record once: dynamic sharding split the files between the workers
        assert all(w._num_tasks() == 1 for w in workers)  # the job ran on both service workers
        gets = {p: n for (m, p), n in proxy.snapshot().items() if m == "GET" and p.startswith(f"/{bucket}/")}
        assert gets == {f"/{bucket}/tfr/part-{i}.tfrecord": 1 for i in range(FILES)}
        st = d.status()
        assert st["hits"] + st["misses"] >= FILES and st["readers"] >= 1
