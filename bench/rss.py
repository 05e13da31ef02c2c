"""Daemon peak RSS while it fetches one large object, against its idle RSS measured in the same run.

    python -m bench.rss [--size 1G] [--part-size 16M] [--workers 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from s3cache.service.config import human_size, parse_size
from s3cache.testing import DaemonProcess, MotoServer

from .proc import memory


def upload(s3, bucket: str, key: str, size: int) -> None:
    """Multipart upload from a repeating random block: the client never holds the object."""
    block = os.urandom(8 << 20)
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key)
    parts, sent, n = [], 0, 1
    while sent < size:
        chunk = block[: min(len(block), size - sent)]
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=n, Body=chunk)
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
        sent += len(chunk)
        n += 1
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--part-size", default="16M")
    ap.add_argument("--workers", default="16")
    a = ap.parse_args()
    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(prefix="s3cache-rss-") as tmp, MotoServer() as moto:
        s3 = moto.client(request_checksum_calculation="when_required")
        s3.create_bucket(Bucket="bench")
        upload(s3, "bench", "big.bin", size)
        with DaemonProcess(Path(tmp) / "cache", moto.url, args=["--part-size", a.part_size, "--workers", a.workers,
                                                                 "--max-size", str(2 * size),
                                                                 "--allow", "s3://bench/"]) as d:
            pid = d.proc.pid
            idle = memory(pid, "VmRSS")
            from s3cache import resolve

            t0 = time.monotonic()
            path = resolve("s3://bench/big.bin", cache_dir=d.cache_dir, timeout=600)
            dt = time.monotonic() - t0
            st = d.wait_until(lambda st: st["objects"]["ready"] == 1)
            peak = memory(pid, "VmHWM")
        assert os.path.getsize(path) == size
        print(f"object {human_size(size)} in {dt:.1f}s ({human_size(size / dt)}/s), verified by "
              f"{st['verified_by']}, {st['requests']} requests")
        print(f"daemon RSS idle {human_size(idle)}, peak {human_size(peak)}; peak/idle {peak / idle:.2f}x; "
              f"peak - idle = {human_size(peak - idle)}")


if __name__ == "__main__":
    main()
