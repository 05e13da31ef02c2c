"""Real TensorFlow reading files through resolve() and s3cache.tf.files()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import write_manifest
from s3cache import FetchFailed, resolve
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
    with pytest.raises(Exception, match="NoSuchKey"):
        next(it)
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
    for py in pkg.glob("*.py"):
        if py.name in ("cli.py",):
            continue
        tree = ast.parse(py.read_text())
        for node in tree.body:  # module level only; tf.py and demo.py import tensorflow inside functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("click", "tensorflow"), f"{py.name} imports {n}"
