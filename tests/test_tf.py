"""Real TensorFlow reading files through resolve() and s3cache.tf.files()."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import write_manifest

from s3cache import FetchFailed, resolve
from s3cache.policy.order import permutation
from s3cache.testing import wait_for
from s3cache.testing.demo import collect, make_shards
from s3cache.testing.faultproxy import FaultProxy

tf = pytest.importorskip("tensorflow")
import s3cache.tf  # noqa: E402


@pytest.fixture
def dataset(tmp_path, s3, bucket):
    expected = make_shards(tmp_path / "src", shards=6, records=50, seed=7)
    uris = []
    for f in sorted((tmp_path / "src").iterdir()):
        s3.put_object(Bucket=bucket, Key=f"tfr/{f.name}", Body=f.read_bytes())
        uris.append(f"s3://{bucket}/tfr/{f.name}")
    return uris, expected


def records(ds):
    return collect(ds)


def test_tfrecorddataset_over_resolve(tmp_path, dataset, daemons):
    uris, expected = dataset
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris))
    assert records(tf.data.TFRecordDataset(resolve(uris, cache_dir=d.cache_dir, timeout=120))) == expected


def test_streaming_files_yield_in_order_as_they_land(tmp_path, moto, dataset, daemons):
    uris, expected = dataset
    last = "/" + uris[-1][5:]
    # The last object's GET is answered with headers and its body held at the proxy until released: the
    # paths before it must come out while it certainly has not landed.
    with FaultProxy(moto.port, stall_seconds=600) as proxy:
        proxy.plan = lambda m, p, q: "stall" if m == "GET" and p == last and not proxy.release.is_set() else None
        try:
            d = daemons(args=["--endpoint-url", proxy.url])  # no manifest: the dataset asks for each file
            it = s3cache.tf.files(uris, cache_dir=d.cache_dir, timeout=120).as_numpy_iterator()
            first = [next(it).decode() for _ in uris[:-1]]
            wait_for(lambda: any(x.status in (200, 206) and not x.done for x in proxy.seen(last)), 120,
                     "the last object's download to be under way, held")
            assert not (d.cache_dir / uris[-1][5:]).exists()
            assert all(x.fault == "stall" for x in proxy.seen(last))  # nothing of it got through yet
        finally:
            proxy.release.set()
        paths = first + [p.decode() for p in it]
    assert paths == [str(d.cache_dir.absolute() / u[5:]) for u in uris]
    got = records(tf.data.TFRecordDataset(s3cache.tf.files(uris, cache_dir=d.cache_dir),
                                          num_parallel_reads=tf.data.AUTOTUNE))
    assert got == expected


def test_jpeg_images_through_the_pipeline_keep_labels_in_step(tmp_path, s3, bucket, daemons):
    uris, labels, pixels = [], [], []
    for i in range(12):
        img = tf.cast(tf.fill([8, 8, 3], i * 20), tf.uint8)
        s3.put_object(Bucket=bucket, Key=f"img/{i:03d}.jpg", Body=tf.io.encode_jpeg(img).numpy())
        uris.append(f"s3://{bucket}/img/{i:03d}.jpg")
        labels.append(i % 3)
        pixels.append(i * 20)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris))
    images = s3cache.tf.files(uris, cache_dir=d.cache_dir, timeout=120).map(tf.io.read_file).map(tf.io.decode_jpeg)
    ds = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(labels)))
    seen = [(int(tf.reduce_mean(tf.cast(img, tf.float32)).numpy() + 0.5), int(lab)) for img, lab in ds]
    assert [lab for _, lab in seen] == labels
    assert all(abs(mean - px) <= 2 for (mean, _), px in zip(seen, pixels))  # JPEG is lossy, barely


def test_a_failed_object_surfaces_from_the_dataset(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="ok", Body=b"")
    d = daemons()
    ds = s3cache.tf.files([f"s3://{bucket}/ok", f"s3://{bucket}/missing"], cache_dir=d.cache_dir, timeout=120)
    it = iter(ds)
    next(it)
    # what a user gets (documented in s3cache.tf.files and the README): tf.errors.UnknownError whose
    # message names the s3cache error, the URI (as in the manifest) and the S3 error code
    with pytest.raises(tf.errors.UnknownError, match=f"FetchFailed: s3://{bucket}/missing: NoSuchKey"):
        next(it)
    odd = s3cache.tf.files([f"s3://{bucket}/gone%20%2541"], cache_dir=d.cache_dir, timeout=120)
    with pytest.raises(tf.errors.UnknownError, match=f"FetchFailed: s3://{bucket}/gone%20%2541: NoSuchKey"):
        next(iter(odd))
    with pytest.raises(FetchFailed):
        resolve(f"s3://{bucket}/missing", cache_dir=d.cache_dir, timeout=120)


def test_import_s3cache_pulls_in_neither_tensorflow_nor_boto3():
    code = ("import sys, s3cache; from s3cache import resolve; "
            "bad = [m for m in ('tensorflow', 'boto3', 'botocore', 'click') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_library_modules_never_import_click_or_tensorflow_at_module_level():
    import ast
    from pathlib import Path

    pkg = Path(s3cache.__file__).parent
    for py in pkg.glob("*.py"):  # the click shell is the s3cache/cli/ package, not globbed here
        tree = ast.parse(py.read_text())
        for node in tree.body:  # module level only; tf.py and demo.py import tensorflow inside functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("click", "tensorflow"), f"{py.name} imports {n}"


def test_shuffled_files_come_in_a_new_deterministic_order_every_epoch_each_record_once(tmp_path, dataset,
                                                                                       daemons):
    uris, expected = dataset
    n = len(uris)
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", uris))
    local = {u: str(d.cache_dir.absolute() / u[5:]) for u in uris}
    ds = s3cache.tf.files(uris, cache_dir=d.cache_dir, timeout=120, shuffle_seed=1234)
    paths = [p.decode() for p in ds.repeat(3).as_numpy_iterator()]
    epochs = [paths[i * n : (i + 1) * n] for i in range(3)]
    for e, got in enumerate(epochs):
        assert got == [local[uris[i]] for i in permutation(n, 1234, e)]
    assert len({tuple(e) for e in epochs}) == 3  # a new order each iteration
    # the same on another dataset object (another run, another host), and in plain Python
    again = s3cache.tf.files(uris, cache_dir=d.cache_dir, timeout=120, shuffle_seed=1234)
    assert [p.decode() for p in again.repeat(2).as_numpy_iterator()] == paths[: 2 * n]
    assert list(s3cache.iter_resolve(uris, cache_dir=d.cache_dir, shuffle_seed=1234, epoch=2)) == epochs[2]
    resumed = s3cache.tf.files(uris, cache_dir=d.cache_dir, shuffle_seed=1234, initial_epoch=1)
    assert [p.decode() for p in resumed.as_numpy_iterator()] == epochs[1]
    # every record exactly once per epoch, byte-identical to what was written
    per_record = records_per_epoch(tf.data.TFRecordDataset(ds.repeat(3)), len(expected))
    assert per_record == [expected] * 3


def records_per_epoch(ds, per_epoch: int) -> list[dict]:
    """Records of a sequential TFRecordDataset split into epochs of ``per_epoch`` records; an id seen
    twice within an epoch fails."""
    from s3cache.testing.demo import parse_fn

    parse = parse_fn()
    out: list[dict] = []
    for i, b in enumerate(ds.batch(per_epoch).map(parse)):
        ids = b["id"].numpy().tolist()
        assert len(ids) == per_epoch and len(set(ids)) == per_epoch, f"epoch {i} repeats or drops records"
        out.append({rid: (x, lab) for rid, x, lab in zip(ids, b["x"].numpy().tolist(), b["label"].numpy().tolist())})
    return out
