"""The daemon's side of announced orders (``order``/``order_list``) and of ``explain``, on the real
parts (tests/parts.py): which lists it knows, how it maps them onto the manifest (its --shard share
too), what the tracker then knows about each file's next use, and what it says about a late file."""

from __future__ import annotations

import pytest
from parts import Rig, catalog

from s3cache.manifest.catalog import Catalog
from s3cache.manifest.parse import Entry
from s3cache.manifest.refs import from_identity
from s3cache.manifest.shard import Shard
from s3cache.policy.order import chunks, list_digest, permutation

B = "s3://bkt/"
KEYS = ["a b", "c#d", "100%", "x%41", "p+q", "Ünï", "plain"]  # identities: raw keys


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "cache", max_size=1000, lease=600.0)
    yield r
    r.close()


def entry(identity: str, size: int) -> Entry:
    return Entry(from_identity(identity), size)


def order_msg(uris, seed=7, epoch=0, reader="r1", start=0, **kw):
    return {"op": "order", "reader": reader, "seed": seed, "epoch": epoch, "n": len(uris), "start": start,
            "list": list_digest(uris), **kw}


def upload(rig, uris):
    for offset, chunk in chunks(uris):
        reply = rig.readers.order_op("order_list", {"op": "order_list", "list": list_digest(uris), "offset": offset,
                                                    "n": len(uris), "uris": chunk})
        assert reply["ok"], reply
    return reply


def distances(rig, n):
    fut = rig.tracker.future(n)
    return [fut.distance(p) for p in range(n)]


def test_the_manifests_own_order_needs_no_upload_and_tells_each_files_next_use(rig):
    uris = [B + k for k in KEYS]
    n = len(uris)
    rig.install(catalog(*(entry(u, 1) for u in uris)))
    assert rig.readers.order_op("order", order_msg(uris, seed=7, epoch=3)) == {"ok": True}
    perm = permutation(n, 7, 3)
    assert distances(rig, n) == [list(perm).index(p) for p in range(n)]
    # the reader resolves its first two files: the daemon's view of it moves along its order
    rig.notes.extend(("r1", "h", uris[perm[k]]) for k in range(2))
    with rig.cond:
        rig.readers.drain()
    d = distances(rig, n)
    assert d[perm[2]] == 0 and d[perm[n - 1]] == n - 3
    assert d[perm[0]] == n - 2 + list(permutation(n, 7, 4)).index(perm[0])  # next used in epoch 4


def test_another_list_is_uploaded_once_then_mapped_and_mapped_again_on_reload(rig):
    man = [B + k for k in KEYS]
    rig.install(catalog(*(entry(u, 1) for u in man)))
    mine = [man[4], man[1], B + "not-listed", man[3]]
    reply = rig.readers.order_op("order", order_msg(mine))
    assert reply["code"] == "UnknownList"
    assert upload(rig, mine) == {"ok": True, "received": 4}
    assert rig.readers.order_op("order", order_msg(mine)) == {"ok": True}
    perm = list(permutation(4, 7, 0))
    d = distances(rig, len(man))
    assert [d[p] for p in (4, 1, 3)] == [perm.index(j) for j in (0, 1, 3)]
    assert d[0] is None and d[2] is None  # not on the reader's list
    # a reloaded manifest moves the positions: the same list maps onto the new ones, no upload
    rig.install(catalog(*(entry(u, 1) for u in reversed(man))))
    assert rig.readers.order_op("order", order_msg(mine)) == {"ok": True}
    d = distances(rig, len(man))
    assert [d[len(man) - 1 - p] for p in (4, 1, 3)] == [perm.index(j) for j in (0, 1, 3)]


def test_a_sharded_daemon_knows_its_share_and_a_whole_manifest_daemon_knows_a_declared_share(rig):
    man = [f"{B}{i:02d}" for i in range(10)]
    entries = [entry(u, 1) for u in man]
    # --shard 1/3: the daemon holds entries 1, 4, 7; a reader listing that share needs no upload
    rig.install(Catalog.build(entries, Shard(1, 3)))
    share = man[1::3]
    assert rig.readers.order_op("order", order_msg(share)) == {"ok": True}
    assert distances(rig, 3) == [list(permutation(3, 7, 0)).index(j) for j in range(3)]
    # the whole manifest, a reader that reads Dataset.shard(3, 1) of it and says so
    rig.install(catalog(*entries))
    assert rig.readers.order_op("order", order_msg(share, share=[1, 3])) == {"ok": True}
    d = distances(rig, 10)
    assert [d[p] for p in (1, 4, 7)] == [list(permutation(3, 7, 0)).index(j) for j in range(3)]
    assert all(d[p] is None for p in range(10) if p % 3 != 1)


def test_several_readers_count_by_nearest_use_and_a_silent_one_stops_counting(rig):
    uris = [f"{B}{i:02d}" for i in range(20)]
    rig.install(catalog(*(entry(u, 1) for u in uris)))
    rig.readers.order_op("order", order_msg(uris, seed=1, reader="r1"))
    rig.readers.order_op("order", order_msg(uris, seed=2, reader="r2"))
    r1, r2 = list(permutation(20, 1, 0)), list(permutation(20, 2, 0))
    assert distances(rig, 20) == [min(r1.index(p), r2.index(p)) for p in range(20)]
    later = rig.tracker.clock() + rig.tracker.idle + 1
    assert not rig.tracker.future(20, later)  # neither announced again nor read within the idle time


def test_bad_order_messages_are_refused_with_a_reason(rig):
    uris = [B + "a", B + "b"]
    rig.install(catalog(*(entry(u, 1) for u in uris)))
    for bad in (order_msg(uris, start=3), order_msg(uris, seed=-1), order_msg(uris, share=[3, 2]),
                order_msg(uris, share="1/2"), {**order_msg(uris), "n": "2"}):
        reply = rig.readers.order_op("order", bad)
        assert reply["code"] == "BadRequest" and reply["error"], bad
    d = list_digest(uris)
    for bad in ({"list": d, "offset": 1, "n": 2, "uris": [B + "b"]},  # out of order
                {"list": d, "offset": 0, "n": 2, "uris": [B + "b", B + "a"]},  # not what the digest says
                {"list": d, "offset": 0, "n": 0, "uris": []},
                {"list": d, "offset": 0, "n": 2, "uris": [1, 2]}):
        reply = rig.readers.order_op("order_list", {"op": "order_list", **bad})
        assert reply["code"] == "BadRequest" and reply["error"], bad
    assert rig.readers.order_op("order", order_msg([B + "b", B + "a"]))["code"] == "UnknownList"


def test_explain_says_queued_behind_n_failed_with_its_code_or_not_asked_for(rig):
    class Conn:  # want keeps waiters by identity; nothing is pushed to them in this test
        send = staticmethod(lambda msg: True)

    uris = [B + k for k in ("q0", "q1", "q2", "bad", "idle")]
    rig.install(catalog(*(entry(u, 1) for u in uris)))
    rig.readers.want(Conn(), "r1", uris[:4])
    with rig.cond:
        rig.schedule.fail(uris[3], "AccessDenied", "Access Denied")
    got = {r["uri"]: r for r in rig.readers.order_op("explain", {"op": "explain", "uris": uris + ["nope"]},
                                                      throughput=2.5e6)["results"]}
    assert got[uris[2]]["state"] == "queued" and got[uris[2]]["text"].startswith("queued behind 2 other file(s)")
    assert "2.5 MB/s" in got[uris[2]]["text"]
    # AccessDenied is retried with backoff (a policy fixed later): the reader is told when
    assert got[uris[3]]["text"].startswith("failed with AccessDenied: Access Denied (retried in ")
    assert got[uris[4]]["state"] == "not_requested"
    assert got["nope"]["state"] == "invalid"


def test_uploaded_lists_stay_within_their_memory_budget(monkeypatch):
    from s3cache.policy import order

    monkeypatch.setattr(order, "MAX_LIST_BYTES", 3 * (64 + 10) * 10)  # room for three lists of 10 short URIs
    lists = order.Lists()
    made = []
    for i in range(5):
        uris = [f"s3://b/{i}/{j:02d}" for j in range(10)]  # 10 characters ... about
        d = list_digest(uris)
        assert lists.upload(d, 0, 10, uris) == 10
        made.append((d, uris))
        assert sum(lists._sizes.values()) <= order.MAX_LIST_BYTES
    known = [d for d, _ in made if d in lists._uploaded]
    assert known and known == [d for d, _ in made][-len(known):]  # the newest kept, the oldest dropped
    big = [f"s3://b/big/{j:04d}" for j in range(100)]
    with pytest.raises(order.ListError, match="larger than"):
        lists.upload(list_digest(big), 0, 100, big)
