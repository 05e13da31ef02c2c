"""The S3 requests a fetcher makes, other than streaming bytes: the client, GETs as requests, HEADs
(describing an object and learning its part sizes) and listings.

Invariants:

* boto3 never retries on its own (``total_max_attempts=1``): there is one retry policy, ``retry.py``'s,
  whose throttle all workers share. Every request here is counted in ``Counters.requests``.
* botocore never hashes a body itself: the fetcher's ``Digest`` checks every byte against the same
  checksum, so a second pass would only cost CPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import botocore.config
import botocore.session

from s3cache.manifest.parse import Entry, Listed

from .checks import manifest_expectations, plan, s3_expectations
from .checksum import Expectation, is_per_part
from .parts import Span, upload_parts
from .retry import BadResponse, RetryPolicy
from .s3loader import S3Loader

log = logging.getLogger("s3cache.fetch")

# Part HEADs answered without a part count before per-part claims are given up as uncheckable.
NO_COUNT_ANSWERS = 3


@dataclass
class Counters:
    """Request and byte counts, for status and for tests that check there is no retry storm."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    throttled: int = 0
    readback: int = 0  # bytes read back from temp files to hash in order (parts that landed out of order)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


@dataclass(frozen=True)
class Described:
    """What S3 says an object is now (one HEAD), and the strongest check its bytes can be held to."""

    size: int
    etag: str
    version: str
    expect: Expectation | None


def make_client(endpoint_url: str | None, region: str | None, pool: int,
                connect_timeout: float, read_timeout: float):
    """A boto3 S3 client whose connection pool matches our concurrency and that never retries itself."""
    cfg = botocore.config.Config(
        max_pool_connections=pool,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1},  # one retry policy, ours, with shared throttling
        response_checksum_validation="when_required",  # we verify the strongest checksum ourselves
        tcp_keepalive=True,
    )
    # botocore's session, not boto3's: boto3 adds only resource and transfer helpers we do not use, and
    # importing it (with s3transfer) cost ~70-100 ms of every daemon start before the first GET.
    session = botocore.session.get_session()
    # Its loader reads the S3 parts of botocore's data alone (s3loader.py): ~20 ms of every start.
    session.register_component("data_loader", S3Loader.create(session.get_config_variable("data_path")))
    client = session.create_client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
    client.meta.events.register("before-call.s3.GetObject", _no_botocore_body_checksum)
    return client


def _no_botocore_body_checksum(context: dict, **_) -> None:
    """Asking for ChecksumMode=ENABLED makes botocore hash the body with the returned CRC as it streams;
    our Digest hashes every byte against that same value (and knows what to do on a mismatch), so the
    second pass only cost ~0.5 CPU s/GB. The checksum headers are still parsed for us."""
    context.get("checksum", {}).pop("response_algorithms", None)


class ObjectApi:
    """GET, HEAD and LIST for one client, counted, HEADs and listings under the retry policy (a GET's
    retry is the caller's: its body must be streamed inside the same attempt)."""

    def __init__(self, client, policy: RetryPolicy, counters: Counters) -> None:
        self.client = client
        self.policy = policy
        self.counters = counters

    def get(self, entry: Entry, span: Span | None, etag: str | None):
        """One GET of ``span`` (the whole object if None), pinned by ``etag`` (If-Match) when given, else
        asking for the object's additional checksums."""
        kw: dict = {"Bucket": entry.ref.bucket, "Key": entry.ref.key}
        if span is not None:
            kw["Range"] = span.header
        if entry.version:
            kw["VersionId"] = entry.version
        if etag:
            kw["IfMatch"] = etag
        else:
            kw["ChecksumMode"] = "ENABLED"
        self.counters.add(requests=1)
        return self.client.get_object(**kw)

    def head(self, entry: Entry, part_number: int | None = None) -> dict:
        """HEAD the object with its additional checksums, or one of its upload parts."""
        kw: dict = {"Bucket": entry.ref.bucket, "Key": entry.ref.key}
        if part_number is None:
            kw["ChecksumMode"] = "ENABLED"
        else:
            # No If-Match here: moto answers a part HEAD with 412 even for the right ETag. A changed object
            # would fail the check anyway and be fetched again, so nothing wrong can be published.
            kw["PartNumber"] = part_number
        if entry.version:
            kw["VersionId"] = entry.version

        def once() -> dict:
            self.counters.add(requests=1)
            return self.client.head_object(**kw)

        return self.policy.run(entry.uri, once)

    def describe(self, entry: Entry, checks: bool = True) -> Described:
        """HEAD the object (with its additional checksums). Raises FetchFailed if it is gone.

        ``checks=False``: the size and ETag are all the caller uses, so no part HEADs are made for a
        per-part check (``expect`` is then None)."""
        head = self.head(entry)
        etag = head.get("ETag", "").strip('"')
        size = int(head["ContentLength"])
        expect = None
        if checks:
            expect, _ = self.checkable(entry, manifest_expectations(entry), s3_expectations(head, etag, True), size)
        return Described(size, etag, head.get("VersionId") or entry.version or "", expect)

    def checkable(self, entry: Entry, manifest: list[Expectation], s3: list[Expectation],
                  total: int) -> tuple[Expectation | None, tuple[Expectation, ...]]:
        """``plan(manifest, s3)`` with the upload's part boundaries given to a per-part check. When the
        server gives no part count (it ignores partNumber) per-part claims cannot be checked: they are
        dropped and the next claim verifies (none: the size alone, with the usual warning)."""
        expect, also = plan(manifest, s3)
        if expect is None or not is_per_part(expect) or expect.part_size or expect.part_sizes:
            return expect, also
        layout = self.part_layout(entry, total)
        if layout is not None:
            return expect._replace(part_sizes=layout), also
        log.warning("%s: the server answered %d part HEADs with no part count (it ignores partNumber), so its "
                    "%s %s cannot be checked", entry.uri, NO_COUNT_ANSWERS, expect.method, expect.value)
        return plan(manifest, [c for c in s3 if not is_per_part(c)])

    def with_boundaries(self, entry: Entry, claim: Expectation, total: int) -> Expectation | None:
        """``claim`` ready to check: a per-part one with its upload's part boundaries (None if the server
        gives no part count)."""
        if not is_per_part(claim) or claim.part_size or claim.part_sizes:
            return claim
        layout = self.part_layout(entry, total)
        return claim._replace(part_sizes=layout) if layout is not None else None

    def part_layout(self, entry: Entry, total: int) -> tuple[int, ...] | None:
        """The upload's part sizes, from ``HeadObject(PartNumber=k)``: parts 1 and N say whether the layout
        is even (every part the size of part 1 but a shorter last one, as uploaders cut them); otherwise
        every part is asked for. Parts may be empty (an upload of 0 bytes, or a last part of 0 bytes).

        None when ``NO_COUNT_ANSWERS`` answers in a row carry no part count: a server that ignores
        partNumber, whose per-part claims can never be checked (retrying the object would not help)."""
        for _ in range(NO_COUNT_ANSWERS):
            head = self.head(entry, part_number=1)
            first, count = int(head.get("ContentLength") or 0), int(head.get("PartsCount") or 0)
            if count > 0:
                break
        else:
            return None
        last = int(self.head(entry, part_number=count)["ContentLength"]) if count > 1 else first
        even = upload_parts(total, count, first, last)
        return even if even is not None else self.part_sizes(entry, count, total)

    def part_sizes(self, entry: Entry, count: int, total: int) -> tuple[int, ...]:
        """Every upload part's size, one HEAD each; they must add up to ``total``."""
        sizes = tuple(int(self.head(entry, part_number=k)["ContentLength"]) for k in range(1, count + 1))
        if sum(sizes) != total:
            raise BadResponse(f"{entry.uri}: the {count} part sizes add up to {sum(sizes)}, not {total}")
        return sizes

    def list(self, bucket: str, prefix: str) -> list[Listed]:
        """Every object under a prefix, in key order (ListObjectsV2, paginated)."""
        out: list[Listed] = []
        uri = f"s3://{bucket}/{prefix}"

        def page(token: str | None):
            kw = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            self.counters.add(requests=1)
            return self.client.list_objects_v2(**kw)

        token = None
        while True:
            resp = self.policy.run(uri, lambda: page(token))
            for o in resp.get("Contents", []):
                out.append(Listed(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"')))
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]
