"""Small prefetch objects through AWS's Common Runtime client (fetch/crt.py), against moto over HTTP
through the fault proxy: which objects go that way, that our checks still decide what is published,
that its failures mean what botocore's do, and that it survives fork() and a stop."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import botocore
import pytest
from test_wrong_bytes import on_nth

from s3cache.errors import ChecksumMismatch, FetchFailed
from s3cache.fetch.fetcher import Fetcher, make_client
from s3cache.fetch.retry import Cancelled
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import ObjectRef
from s3cache.testing import wait_for

KiB, MiB = 1 << 10, 1 << 20
CRT_AGENT = "CRTS3NativeClient"


@pytest.fixture
def crt_fetcher(store):
    """``crt_fetcher(proxy_or_url, **Fetcher kwargs) -> Fetcher`` with the CRT transport, into ``store``."""
    made = []

    def make(url, client=None, max_attempts=3, workers=4, **kw):
        url = getattr(url, "url", url)
        f = Fetcher(client or make_client(url, "us-east-1", 16, 5, 10), part_size=MiB, workers=workers,
                    max_attempts=max_attempts, cancel=threading.Event(), new_temp=store.new_temp,
                    discard=store.discard, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def temp_files(store) -> list[str]:
    return os.listdir(store.layout.tmp)


def agents(proxy, key: str) -> list[str]:
    return [e.headers.get("user-agent", "") for e in proxy.seen(key)]


def sized(bucket: str, key: str, size: int, **kw) -> Entry:
    return Entry(ObjectRef(bucket, key), size=size, **kw)


def test_a_small_prefetch_is_one_crt_get_checked_against_s3s_checksum(moto, bucket, proxy, crt_fetcher, store):
    body = os.urandom(256 * KiB)
    moto.client().put_object(Bucket=bucket, Key="k", Body=body)  # boto3's default CRC32
    f = crt_fetcher(proxy)
    got = f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
    assert Path(got.tmp_path).read_bytes() == body
    assert os.path.dirname(got.tmp_path) == store.layout.tmp and os.stat(got.tmp_path).st_mode & 0o777 == 0o600
    # The claim came in the CRT's answer (the x-amz-checksum-mode we sent) and was checked: no HEAD.
    assert got.method == "s3-crc32"
    [ex] = proxy.seen(f"/{bucket}/k")
    assert ex.headers["user-agent"].startswith(CRT_AGENT) and ex.headers["x-amz-checksum-mode"] == "ENABLED"
    assert f.counters.requests == 1 and f.counters.bytes == len(body)


def test_keys_with_spaces_unicode_and_plus_are_quoted(moto, bucket, proxy, crt_fetcher):
    s3 = moto.client()
    bodies = {k: os.urandom(1000 + i) for i, k in enumerate(["a b/c+d.bin", "ü/naïve €.bin", "x%2By=z&q?.bin"])}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    f = crt_fetcher(proxy)
    for k, b in bodies.items():
        got = f.fetch(sized(bucket, k, len(b)), admit=lambda n: True)
        assert Path(got.tmp_path).read_bytes() == b, k
        assert agents(proxy, f"/{bucket}/{k}") == [agents(proxy, f"/{bucket}/{k}")[0]]
        assert agents(proxy, f"/{bucket}/{k}")[0].startswith(CRT_AGENT)


def test_readers_early_files_and_large_objects_of_known_size_keep_botocore(s3, bucket, proxy, crt_fetcher):
    for k, n in (("fg", 1000), ("early", 1000), ("big", 3 * MiB)):
        s3.put_object(Bucket=bucket, Key=k, Body=os.urandom(n))
    f = crt_fetcher(proxy, prefetch_part_size=2 * MiB)
    f.fetch(sized(bucket, "fg", 1000), admit=lambda n: True, foreground=True)
    f.fetch(sized(bucket, "early", 1000), admit=lambda n: True, early=1)
    f.fetch(Entry(ObjectRef(bucket, "fg")), admit=lambda n: True, foreground=True)  # unknown size too
    f.fetch(sized(bucket, "big", 3 * MiB), admit=lambda n: True)
    for k in ("fg", "early", "big"):
        assert agents(proxy, f"/{bucket}/{k}") and not any(a.startswith(CRT_AGENT) for a in agents(proxy, f"/{bucket}/{k}")), k


def test_transport_botocore_turns_it_off(s3, bucket, proxy, crt_fetcher):
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 5000)
    f = crt_fetcher(proxy, transport="botocore")
    assert f.crt is None
    got = f.fetch(sized(bucket, "k", 5000), admit=lambda n: True)
    assert got.method == "etag-md5" and not agents(proxy, f"/{bucket}/k")[0].startswith(CRT_AGENT)


def test_a_flipped_byte_is_refused_and_fetched_again(s3, bucket, aws_proxy, crt_fetcher, store):
    body = os.urandom(300 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = on_nth(1, "flip")
    f = crt_fetcher(aws_proxy)
    got = f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
    assert aws_proxy.faults["flip"] == 1 and f.counters.retries == 1
    assert Path(got.tmp_path).read_bytes() == body and got.method == "etag-md5"
    assert all(a.startswith(CRT_AGENT) for a in agents(aws_proxy, f"/{bucket}/k"))
    assert temp_files(store) == [os.path.basename(got.tmp_path)]


def test_bytes_that_never_match_are_never_published_and_leave_no_temp_file(s3, bucket, aws_proxy, crt_fetcher,
                                                                            store):
    body = os.urandom(200 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = lambda m, p, q: "flip" if m == "GET" else None
    f = crt_fetcher(aws_proxy, max_attempts=3)
    with pytest.raises(ChecksumMismatch):
        f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
    assert aws_proxy.faults["flip"] == 3
    assert all(a.startswith(CRT_AGENT) for a in agents(aws_proxy, f"/{bucket}/k"))
    assert temp_files(store) == []


def test_a_missing_object_fails_at_once_as_no_such_key(s3, bucket, proxy, crt_fetcher, store):
    f = crt_fetcher(proxy)
    with pytest.raises(FetchFailed) as ei:
        f.fetch(sized(bucket, "nope", 1000), admit=lambda n: True)
    assert ei.value.code == "NoSuchKey"
    assert f.counters.retries == 0 and f.counters.requests == 1
    assert agents(proxy, f"/{bucket}/nope")[0].startswith(CRT_AGENT)
    assert temp_files(store) == []  # the CRT's file of a failed request is gone too


def test_an_unsigned_request_is_denied_and_not_retried(moto, s3, bucket, proxy, crt_fetcher, store):
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 100)
    f = crt_fetcher(proxy, client=make_unsigned(proxy.url))
    with pytest.raises(FetchFailed) as ei:
        f.fetch(sized(bucket, "k", 100), admit=lambda n: True)
    assert ei.value.code == "AccessDenied" and f.counters.retries == 0
    assert agents(proxy, f"/{bucket}/k")[0].startswith(CRT_AGENT)
    assert temp_files(store) == []


def make_unsigned(url: str):
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=url, region_name="us-east-1",
        config=botocore.config.Config(signature_version=botocore.UNSIGNED, retries={"total_max_attempts": 1}))


def test_a_503_is_retried_under_the_shared_throttle(s3, bucket, proxy, crt_fetcher):
    body = os.urandom(10 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    proxy.plan = on_nth(1, "503")
    f = crt_fetcher(proxy)
    got = f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
    assert Path(got.tmp_path).read_bytes() == body
    assert (f.counters.retries, f.counters.throttled, f.counters.requests) == (1, 1, 2)
    assert proxy.statuses(f"/{bucket}/k") == {503: 1, 206: 1}  # the CRT asks for a range


def test_a_reset_connection_is_retried(s3, bucket, proxy, crt_fetcher):
    body = os.urandom(100 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    proxy.plan = on_nth(1, "reset")
    f = crt_fetcher(proxy)
    got = f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
    assert Path(got.tmp_path).read_bytes() == body and f.counters.retries == 1


def test_a_listed_size_that_is_out_of_date_is_handled(s3, bucket, proxy, crt_fetcher):
    grown, shrunk = os.urandom(3 * MiB), os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="grown", Body=grown)
    s3.put_object(Bucket=bucket, Key="shrunk", Body=shrunk)
    f = crt_fetcher(proxy, prefetch_part_size=MiB)
    admitted = []

    def admit(n):
        admitted.append(n)
        return True

    got = f.fetch(sized(bucket, "grown", 1000, size_is_hint=True), admit=admit)
    assert Path(got.tmp_path).read_bytes() == grown and admitted == [1000, len(grown)]
    got = f.fetch(sized(bucket, "shrunk", 5000, size_is_hint=True), admit=admit)
    assert Path(got.tmp_path).read_bytes() == shrunk and admitted[-2:] == [5000, len(shrunk)]
    with pytest.raises(FetchFailed) as ei:  # a manifest's size is not a hint: another size is another object
        f.fetch(sized(bucket, "shrunk", 5000), admit=admit)
    assert ei.value.code == "SizeMismatch"


def test_a_stop_cancels_a_stalled_crt_get_and_leaves_no_temp_file(s3, bucket, proxy, crt_fetcher, store):
    s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(50 * KiB))
    proxy.stall_seconds = 60
    proxy.plan = lambda m, p, q: "stall" if m == "GET" else None
    f = crt_fetcher(proxy)
    out: list = []
    t = threading.Thread(target=lambda: out.append(_outcome(f, sized(bucket, "k", 50 * KiB))))
    t.start()
    try:
        wait_for(lambda: proxy.seen(f"/{bucket}/k"), 30, "the CRT's GET to reach the proxy")
        t0 = time.monotonic()
        f.cancel.set()
        f.abort()
        t.join(30)
        assert not t.is_alive() and time.monotonic() - t0 < 10
    finally:
        proxy.release.set()
        t.join(30)
    assert isinstance(out[0], Cancelled), out
    assert temp_files(store) == []


def _outcome(f: Fetcher, entry: Entry):
    try:
        return f.fetch(entry, admit=lambda n: True)
    except BaseException as e:  # noqa: BLE001 - the test looks at it
        return e


def test_a_forked_child_fetches_through_a_fresh_crt_client(s3, bucket, proxy, crt_fetcher, store):
    a, b = os.urandom(20 * KiB), os.urandom(30 * KiB)
    s3.put_object(Bucket=bucket, Key="a", Body=a)
    s3.put_object(Bucket=bucket, Key="b", Body=b)
    f = crt_fetcher(proxy)
    f.fetch(sized(bucket, "a", len(a)), admit=lambda n: True)  # the parent's client exists now
    r, w = os.pipe()
    with f.crt._lock:  # held at fork(), as by a parent's thread starting a request: the child must not hang on it
        pid = os.fork()
        if pid == 0:  # the child: report the file it got, then leave without running the parent's cleanup
            code = 1
            try:
                os.close(r)
                got = f.fetch(sized(bucket, "b", len(b)), admit=lambda n: True)
                os.write(w, got.tmp_path.encode())
                code = 0
            finally:
                os._exit(code)
    os.close(w)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish its CRT GET in 60 s")
        path = os.read(r, 4096).decode()
    finally:
        os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert Path(path).read_bytes() == b
    assert all(x.startswith(CRT_AGENT) for x in agents(proxy, f"/{bucket}/b"))
    # and the parent's client still works after the child's
    assert Path(f.fetch(sized(bucket, "b", len(b)), admit=lambda n: True).tmp_path).read_bytes() == b


def test_the_daemon_prefetches_small_objects_through_the_crt_and_stops_cleanly(tmp_path, s3, bucket, proxy,
                                                                                  daemons):
    from conftest import write_manifest

    from s3cache import resolve
    from s3cache.daemon.demand import FIRST_FILES

    bodies = {f"s/{i:02d}": os.urandom(64 * KiB + i) for i in range(FIRST_FILES + 8)}
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    lines = [f"s3://{bucket}/{k} size={len(b)}" for k, b in bodies.items()]
    d = daemons(manifest=write_manifest(tmp_path / "m.txt", lines),
                args=["--workers", "4", "--endpoint-url", proxy.url, "--max-size", "1G", "--min-free", "0"])
    st = d.wait_until(lambda st: st["objects"]["ready"] == len(bodies))
    assert st["requests"] == len(bodies)  # each CRT GET counted, and nothing else was needed
    for i, (k, b) in enumerate(bodies.items()):
        assert Path(resolve(f"s3://{bucket}/{k}", cache_dir=d.cache_dir)).read_bytes() == b
        # the job's first files come as a reader's would (botocore, with the Link's priorities); the rest by CRT
        assert [a.startswith(CRT_AGENT) for a in agents(proxy, f"/{bucket}/{k}")] == [i >= FIRST_FILES], k
    assert d.stop() == 0  # and the daemons fixture finds no loop error or traceback in its log


def test_refreshable_credentials_are_asked_of_botocore_at_each_signing(s3, bucket, proxy, crt_fetcher):
    """One credential chain: credentials botocore refreshes (an instance role, SSO) sign the CRT's GETs as
    botocore has them now, not a copy taken when the CRT's client was made."""
    import re
    from datetime import datetime, timedelta, timezone

    import botocore.config
    import botocore.credentials
    import botocore.session

    s3.put_object(Bucket=bucket, Key="k", Body=b"y" * 3000)
    issued: list[str] = []

    def refresh():
        issued.append(f"AKIAROTATING{len(issued):08d}")
        # expiring within botocore's mandatory refresh window: every use asks again (moto takes any key)
        soon = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        return {"access_key": issued[-1], "secret_key": "testing", "token": None, "expiry_time": soon}

    class Rotating(botocore.credentials.CredentialProvider):
        METHOD = "rotating-test"

        def load(self):
            return botocore.credentials.RefreshableCredentials.create_from_metadata(refresh(), refresh, self.METHOD)

    session = botocore.session.get_session()
    session.get_component("credential_provider").insert_before("env", Rotating())
    client = session.create_client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                                   config=botocore.config.Config(retries={"total_max_attempts": 1}))
    f = crt_fetcher(proxy, client=client)
    for _ in range(2):
        assert Path(f.fetch(sized(bucket, "k", 3000), admit=lambda n: True).tmp_path).read_bytes() == b"y" * 3000
    gets = proxy.seen(f"/{bucket}/k")
    assert all(e.headers["user-agent"].startswith(CRT_AGENT) for e in gets)
    signed = [re.search(r"Credential=(\w+)/", e.headers["authorization"]).group(1) for e in gets]
    assert len(signed) == 2 and signed[0] != signed[1] and set(signed) <= set(issued), (signed, issued)


@pytest.mark.parametrize("fault", ["flip", "short", "reset", "shift", "ignore-range", "range-as-200", "lie-total"])
def test_every_broken_answer_of_the_proxy_is_refused_or_repaired(s3, bucket, aws_proxy, crt_fetcher, store, fault):
    """The fault proxy's broken answers to the CRT's (ranged) GET: each is fetched again or taken only
    when it is the object; never a wrong byte in a returned file."""
    body = os.urandom(200 * KiB + 7)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    aws_proxy.plan = on_nth(1, fault)
    f = crt_fetcher(aws_proxy)
    got = f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
    assert aws_proxy.faults[fault] == 1
    assert Path(got.tmp_path).read_bytes() == body and got.size == len(body)
    assert agents(aws_proxy, f"/{bucket}/k")[0].startswith(CRT_AGENT)
    assert temp_files(store) == [os.path.basename(got.tmp_path)]


def test_a_full_disk_is_disk_full_and_leaves_no_temp_file(s3, bucket, proxy, small_fs):
    """ENOSPC in the CRT's writes is the daemon's DiskFull (it evicts for room), not a transfer error."""
    from s3cache.fetch.stream import DiskFull
    from s3cache.store.files import Store

    body = os.urandom(1536 * KiB)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    store = Store(str(small_fs("1m") / "cache"))
    store.open()
    f = Fetcher(make_client(proxy.url, "us-east-1", 16, 5, 10), part_size=MiB, prefetch_part_size=2 * MiB,
                workers=2, max_attempts=3, cancel=threading.Event(), new_temp=store.new_temp,
                discard=store.discard)
    try:
        with pytest.raises(DiskFull):
            f.fetch(sized(bucket, "k", len(body)), admit=lambda n: True)
        assert f.counters.retries == 0
        assert agents(proxy, f"/{bucket}/k")[0].startswith(CRT_AGENT)
        assert temp_files(store) == []
    finally:
        f.close()
        store.close()


def test_a_readers_get_takes_the_next_slot_ahead_of_waiting_crt_prefetches(s3, bucket, proxy, crt_fetcher):
    """Both transports share one link budget: with every slot held by a (stalled) CRT prefetch, a reader's
    GET waits for that one request only, and goes before the CRT prefetches queued for a slot."""
    for k in ("p0", "p1", "p2", "p3", "fg"):
        s3.put_object(Bucket=bucket, Key=k, Body=os.urandom(20 * KiB))
    proxy.stall_seconds = 60
    proxy.plan = lambda m, p, q: "stall" if m == "GET" and p.endswith("/p0") and not proxy.release.is_set() else None
    f = crt_fetcher(proxy, max_attempts=3, workers=1)  # one connection
    outs: dict = {}

    def run(key: str, fg: bool) -> None:
        outs[key] = _outcome_fg(f, sized(bucket, key, 20 * KiB), fg)

    threads = [threading.Thread(target=run, args=("p0", False))]
    threads[0].start()
    try:
        wait_for(lambda: proxy.seen(f"/{bucket}/p0"), 30, "the first prefetch to hold the only slot")
        threads += [threading.Thread(target=run, args=(k, False)) for k in ("p1", "p2", "p3")]
        threads.append(threading.Thread(target=run, args=("fg", True)))
        for t in threads[1:]:
            t.start()
        wait_for(lambda: f.link.fg_waiting == 1, 30, "the reader's GET to wait for a slot")
    finally:
        proxy.release.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert all(not isinstance(v, BaseException) for v in outs.values()), outs
    order = [e.path.rsplit("/", 1)[1] for e in proxy.exchanges if e.method == "GET"]
    assert order[0] == "p0" and order[1] == "fg", order
    assert {a.startswith(CRT_AGENT) for k in ("p1", "p2", "p3") for a in agents(proxy, f"/{bucket}/{k}")} == {True}


def _outcome_fg(f: Fetcher, entry: Entry, foreground: bool):
    try:
        return f.fetch(entry, admit=lambda n: True, foreground=foreground)
    except BaseException as e:  # noqa: BLE001 - the test looks at it
        return e


def test_a_pinned_version_comes_through_the_crt(s3, bucket, proxy, crt_fetcher):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = os.urandom(4000)
    v1 = s3.put_object(Bucket=bucket, Key="v", Body=old)["VersionId"]
    s3.put_object(Bucket=bucket, Key="v", Body=os.urandom(4000))
    f = crt_fetcher(proxy)
    got = f.fetch(sized(bucket, "v", 4000, version=v1), admit=lambda n: True)
    assert Path(got.tmp_path).read_bytes() == old and got.version == v1
    [ex] = proxy.seen(f"/{bucket}/v")
    assert ex.headers["user-agent"].startswith(CRT_AGENT) and f"versionId={v1}" in ex.query


def test_an_endpoint_that_refuses_connections_is_retried_as_unreachable(store, crt_fetcher):
    from s3cache.testing import free_port

    f = crt_fetcher(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(FetchFailed) as ei:
        f.fetch(sized("b-1", "k", 1000), admit=lambda n: True)
    # the code botocore's path gives, and the outage it opens (one line while S3 cannot be reached)
    assert ei.value.code == "EndpointConnectionError" and f.counters.retries == 1
    assert f.policy.outage.active
    assert temp_files(store) == []
