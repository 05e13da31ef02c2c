"""Issue 14.2 on a real engine: two worker processes under tf.distribute.MultiWorkerMirroredStrategy
(CPU, localhost), each with its own daemon and cache dir started with ``--shard auto`` from the worker's
TF_CONFIG, train a tiny Keras model on TFRecord files read through resolve(), with tf.data's FILE
auto-shard policy over the same file list. Counted at each daemon's S3 endpoint: each fetched exactly
its share, the shares are disjoint and cover the dataset; and both workers finished training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_manifest

from s3cache.testing import free_port, wait_for
from s3cache.testing.faultproxy import FaultProxy

tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.slow

FILES, RECORDS, STEPS = 8, 16, 6  # tiny: the point is who fetches what, not throughput
WORKER = Path(__file__).with_name("multiworker_train.py")


def write_tfrecords(path: Path, seed: int) -> bytes:
    with tf.io.TFRecordWriter(str(path)) as w:
        for j in range(RECORDS):
            x = [float(seed), float(j), 1.0, -1.0]
            ex = tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
                "y": tf.train.Feature(float_list=tf.train.FloatList(value=[sum(x) / 10])),
            }))
            w.write(ex.SerializeToString())
    return path.read_bytes()


def object_gets(proxy: FaultProxy, bucket: str) -> dict[str, int]:
    return {p.split("/", 2)[2]: n for (m, p), n in proxy.snapshot().items()
            if m == "GET" and p.startswith(f"/{bucket}/")}


@pytest.mark.parametrize("engine", ["loop", "fit"])
def test_two_workers_under_multiworkermirroredstrategy_each_fetch_their_share(tmp_path, moto, s3, bucket, daemons,
                                                                              engine):
    """``loop``: a Keras 3 model trained by a custom loop (Keras 3's fit cannot run under this strategy,
    keras-team/keras#20585). ``fit``: Keras 2's Model.fit (tf-keras with TF_USE_LEGACY_KERAS=1), where
    tf-keras is installed (it is not a dependency: its wheel requires the full ``tensorflow`` package)."""
    legacy = {}
    if engine == "fit":
        tf_keras = pytest.importorskip("tf_keras")
        legacy = {"TF_USE_LEGACY_KERAS": "1",
                  "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(tf_keras.__file__)),
                                                 os.environ.get("PYTHONPATH", "")])}
    keys = []
    for i in range(FILES):
        f = tmp_path / f"part-{i:05d}.tfrecord"
        s3.put_object(Bucket=bucket, Key=f"train/{f.name}", Body=write_tfrecords(f, i))
        keys.append(f"train/{f.name}")
    uris = [f"s3://{bucket}/{k}" for k in keys]
    manifest = write_manifest(tmp_path / "m.txt", uris)
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    proxies = [FaultProxy(moto.port).start() for _ in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        ds, specs = [], []
        for i in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            d = daemons(tmp_path / f"cache{i}", manifest=manifest,
                        args=["--endpoint-url", proxies[i].url, "--shard", "auto"], env={"TF_CONFIG": tf_config})
            ds.append(d)
            spec = {"uris": uris, "cache_dir": str(d.cache_dir), "global_batch": 8, "steps": STEPS,
                    "fit": engine == "fit",
                    "out": str(tmp_path / f"result{i}.json")}
            (tmp_path / f"spec{i}.json").write_text(json.dumps(spec))
            specs.append(spec)
        for i in range(2):
            env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", **legacy}
            with open(tmp_path / f"worker{i}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"spec{i}.json")],
                                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        def finished():
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    raise AssertionError(f"worker {i} exited with {p.returncode}:\n"
                                         + (tmp_path / f"worker{i}.log").read_text(errors="replace")[-4000:])
            return all(p.poll() == 0 for p in procs)

        wait_for(finished, 600, "both workers to finish training", interval=0.5)
        results = [json.loads(Path(s["out"]).read_text()) for s in specs]
        sts = [d.wait_until(lambda st: st["objects"]["queued"] == 0 and st["objects"]["fetching"] == 0,
                            what="the share to land") for d in ds]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for p in proxies:
            p.stop()

    shares = [keys[i::2] for i in range(2)]  # Dataset.shard(2, i) over the same list
    fetched = [object_gets(p, bucket) for p in proxies]
    print(f"per-host GETs: worker 0 {fetched[0]}; worker 1 {fetched[1]}")
    for i in range(2):
        assert fetched[i] == {k: 1 for k in shares[i]}, f"daemon {i} fetched outside its share, or twice"
        assert sts[i]["shard"] == f"{i}/2" and sts[i]["manifest_entries"] == FILES // 2
        assert sts[i]["off_share"]["count"] == 0  # its worker never asked for another worker's file
        # Training read through resolve() only its own files: tf.data's shard and the daemon's agree.
        assert results[i]["resolved"] and set(results[i]["resolved"]) <= {f"s3://{bucket}/{k}" for k in shares[i]}
        assert results[i]["task"] == {"type": "worker", "index": i} and len(results[i]["loss"]) == (1 if engine == "fit" else STEPS)
    assert not set(fetched[0]) & set(fetched[1]) and set(fetched[0]) | set(fetched[1]) == set(keys)
    # One synchronous job: every step's loss is reduced across both workers, so both saw the same.
    assert results[0]["loss"] == results[1]["loss"]
