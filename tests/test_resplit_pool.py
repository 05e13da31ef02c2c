"""A reader's object re-split while its parts run on the readers' part pool: a part cut short sends its
rest in smaller parts to that same pool and waits for them. With every thread of the pool such a part,
none was left to run the smaller ones, and the fetch (and its reader) waited for ever: seen in the
matrix's 256 MiB cell with the daemon running, all sixteen threads of the pool waiting in ``span``."""

from __future__ import annotations

import os
import threading

from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.fetch.parts import Span
from s3cache.fetch.ranged import Priority
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef

MiB = 1 << 20


def test_a_span_sent_from_a_thread_of_a_full_pool_still_ends(moto, s3, bucket, store):
    body = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=body)
    f = Fetcher(make_client(moto.url, "us-east-1", 16, 5, 10), part_size=MiB, workers=2, max_attempts=3,
                cancel=threading.Event(), new_temp=store.new_temp, discard=store.discard, transport="botocore")
    pool = f.parts._fg_parts  # a reader's parts go here, and so do the rests of its parts cut short
    held, release = threading.Event(), threading.Event()
    fd, tmp = store.new_temp("big")
    try:
        os.ftruncate(fd, len(body))
        blocker = pool.submit(lambda: (held.set(), release.wait(120)))  # another part, waiting too
        assert held.wait(30)
        # the pool's last thread sends a span's parts to its own pool and waits for them
        spanned = pool.submit(f.parts.span, Entry(ObjectRef(bucket, "big")), fd, Span(0, len(body) - 1),
                              len(body), None, Priority(True))
        spanned.result(timeout=120)  # before: every part queued behind the two waiting threads
        assert os.pread(fd, len(body), 0) == body
    finally:
        release.set()
        blocker.result(timeout=120)
        os.close(fd)
        store.discard(tmp)
        f.close()
