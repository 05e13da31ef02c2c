"""The daemon's local steps per object, no network, by batch size (``python -m bench.cpu --store-path``):
the temp file (create, preallocate, write, fdatasync), ``plan``, the ``publishing`` intent transaction,
rename and directory fsync, the ``ready`` transaction. What the publisher's batching buys: the index
transactions and directory fsyncs are per batch, the rest per object."""

from __future__ import annotations

import os
import tempfile

from s3cache.service.config import human_size


def store_path(size: int, count: int) -> str:
    """CPU ms per object of each local step of a fetch and publish, at batch sizes 1, 8 and 64."""
    import resource
    from dataclasses import replace

    from s3cache.manifest.refs import from_identity
    from s3cache.store.files import Store
    from s3cache.store.index import PUBLISHING, READY, Index, Record

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    data = os.urandom(size)
    steps = ("file", "plan", "intent", "rename+dir fsync", "ready")
    lines = [f"Local steps per object of {human_size(size)}, CPU ms ({count} objects per batch size):", "",
             "| batch | " + " | ".join(steps) + " | total |", "|---:|" + "---:|" * (len(steps) + 1)]
    for batch in (1, 8, 64):
        with tempfile.TemporaryDirectory(prefix="s3cache-cpu-") as d:
            store = Store(os.path.join(d, "cache"))
            store.open()
            index = Index(store.layout.index)
            t = dict.fromkeys(steps, 0.0)
            for i in range(0, count, batch):
                c = [cpu()]
                items = []
                for j in range(i, i + batch):
                    fd, tmp = store.new_temp(f"{j:05d}.bin")
                    os.posix_fallocate(fd, 0, size)
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, size)
                    os.fdatasync(fd)
                    os.close(fd)
                    items.append((f"s3://bench/small/{j:05d}.bin", tmp))
                c.append(cpu())
                planned: set[str] = set()
                plans = []
                for uri, tmp in items:
                    rel = store.plan(from_identity(uri), planned)
                    planned.add(rel)
                    plans.append((uri, tmp, Record(PUBLISHING, rel, size, "e", "", "crc32", "AAAAAA==", 1.0)))
                c.append(cpu())
                index.put_many((u, r) for u, _, r in plans)
                c.append(cpu())
                store.publish([(tmp, r.path) for _, tmp, r in plans])
                c.append(cpu())
                index.put_many([(u, replace(r, state=READY)) for u, _, r in plans])
                c.append(cpu())
                for k, step in enumerate(steps):
                    t[step] += c[k + 1] - c[k]
            index.close()
            store.close()
        lines.append(f"| {batch} | " + " | ".join(f"{1000 * t[x] / count:.3f}" for x in steps)
                     + f" | {1000 * sum(t.values()) / count:.3f} |")
    return "\n".join(lines)
