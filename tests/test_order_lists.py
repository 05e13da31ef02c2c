"""The lists readers announce orders over (s3cache.policy.order.Lists, chunks, ListMap), pure: what the
daemon's ``order`` and ``order_list`` handlers rely on. A digest maps to the manifest, a share of it or
an uploaded list; uploads come in order, must hash to their digest and stay bounded; a map is never
used for a manifest it was not built against."""

from __future__ import annotations

import pytest

from s3cache.policy import order
from s3cache.policy.order import (
    LIST_CHUNK,
    LIST_CHUNK_BYTES,
    MAX_LIST_URIS,
    MAX_LISTS,
    ListError,
    ListMap,
    Lists,
    chunks,
    list_digest,
)

MANIFEST = [f"s3://b/{i:03d}" for i in range(10)]
POS = {u: i for i, u in enumerate(MANIFEST)}


class Manifest:
    """One loaded manifest: the token the daemon passes, its URIs and positions (counts the lookups)."""

    def __init__(self, uris: list[str]) -> None:
        self.token = object()
        self.uris = uris
        self.pos = {u: i for i, u in enumerate(uris)}
        self.listed = self.looked_up = 0

    def manifest_uris(self):
        self.listed += 1
        return iter(self.uris)

    def position_of(self, uri: str):
        self.looked_up += 1
        return self.pos.get(uri)

    def map(self, lists: Lists, digest: str, n: int, share=None) -> ListMap | None:
        return lists.map_for(digest, n, share, token=self.token, manifest_n=len(self.uris),
                             manifest_uris=self.manifest_uris, position_of=self.position_of)


def positions(lm: ListMap) -> list[int | None]:
    return [lm.position(j) for j in range(lm.length)]


def upload_whole(lists: Lists, uris: list[str]) -> str:
    d = list_digest(uris)
    assert lists.upload(d, 0, len(uris), uris) == len(uris)
    return d


def test_the_manifests_own_list_and_its_shares_need_no_upload():
    m, lists = Manifest(MANIFEST), Lists()
    assert positions(m.map(lists, list_digest(MANIFEST), 10)) == list(range(10))
    share = m.map(lists, list_digest(MANIFEST[1::3]), 3, share=(1, 3))
    assert positions(share) == [1, 4, 7] and share.index(4) == 1
    assert positions(m.map(lists, list_digest(MANIFEST[0::4]), 3, share=(0, 4))) == [0, 4, 8]
    assert positions(m.map(lists, list_digest(MANIFEST[1::2]), 5, share=(1, 2))) == [1, 3, 5, 7, 9]
    # the share's digest is computed once per manifest, then remembered
    listed = m.listed
    m.map(lists, list_digest(MANIFEST[1::3]), 3, share=(1, 3))
    assert m.listed == listed


def test_a_list_that_is_not_the_manifest_is_unknown_until_uploaded():
    m, lists = Manifest(MANIFEST), Lists()
    assert m.map(lists, list_digest(MANIFEST[:5]), 5) is None
    assert m.map(lists, list_digest(MANIFEST), 9) is None  # the manifest's digest, with another length
    assert m.map(lists, list_digest(MANIFEST[1::3]), 3, share=(2, 3)) is None  # another share's digest


@pytest.mark.parametrize("share", [(3, 3), (-1, 3), (0, 0)])
def test_a_share_outside_its_count_is_refused(share):
    with pytest.raises(ListError, match=r"index must be in 0\.\.count-1"):
        Manifest(MANIFEST).map(Lists(), "d", 1, share=share)
    with pytest.raises(ValueError, match="share index"):
        ListMap.share(10, share[0], share[1])


def test_a_new_manifest_gets_its_own_share_digests():
    old, new, lists = Manifest(MANIFEST), Manifest(MANIFEST[::-1]), Lists()
    assert old.map(lists, list_digest(MANIFEST[0::2]), 5, share=(0, 2)) is not None
    assert new.map(lists, list_digest(MANIFEST[0::2]), 5, share=(0, 2)) is None  # stale digest not reused
    assert new.map(lists, list_digest(MANIFEST[::-1][0::2]), 5, share=(0, 2)) is not None


def test_shares_remembered_are_bounded_and_stay_right(monkeypatch):
    monkeypatch.setattr(order, "MAX_SHARES", 2)
    m, lists = Manifest(MANIFEST), Lists()
    for k in (2, 3, 4, 5):
        assert m.map(lists, list_digest(MANIFEST[0::k]), len(MANIFEST[0::k]), share=(0, k)) is not None
    assert len(lists._digests) == 2
    assert m.map(lists, list_digest(MANIFEST[0::2]), 5, share=(0, 2)) is not None


def test_an_uploaded_list_maps_its_uris_to_manifest_positions_once_per_manifest():
    m, lists = Manifest(MANIFEST), Lists()
    mine = ["s3://b/007", "s3://b/gone", "s3://b/002"]
    d = list_digest(mine)
    assert lists.upload(d, 0, 3, mine[:2]) == 2
    assert m.map(lists, d, 3) is None  # not whole yet
    assert lists.upload(d, 2, 3, mine[2:]) == 3
    lm = m.map(lists, d, 3)
    assert positions(lm) == [7, None, 2] and lm.index(2) == 2 and lm.index(7) == 0 and lm.index(0) is None
    looked = m.looked_up
    assert m.map(lists, d, 3) is lm and m.looked_up == looked  # built once for this manifest
    reloaded = Manifest(["s3://b/002", "s3://b/gone", "s3://b/007"])
    assert positions(reloaded.map(lists, d, 3)) == [2, 1, 0]  # mapped again onto the new manifest
    assert lists.upload(d, 0, 3, []) == 3  # already known: nothing more to send
    with pytest.raises(ListError, match=f"list {d} has 3 URIs, the order says 4"):
        m.map(lists, d, 4)


def test_a_chunk_out_of_order_restarts_the_upload():
    lists, mine = Lists(), MANIFEST[:6]
    d = list_digest(mine)
    assert lists.upload(d, 0, 6, mine[:2]) == 2
    with pytest.raises(ListError, match="chunk at 4, expected 2; start again at 0"):
        lists.upload(d, 4, 6, mine[4:])
    with pytest.raises(ListError, match="chunk at 2, expected 0"):
        lists.upload(d, 2, 6, mine[2:4])
    assert lists.upload(d, 0, 6, mine[:3]) == 3 and lists.upload(d, 3, 6, mine[3:]) == 6
    assert Manifest(MANIFEST).map(lists, d, 6) is not None


@pytest.mark.parametrize("total", [0, -1, MAX_LIST_URIS + 1])
def test_a_list_of_no_uris_or_too_many_is_refused(total):
    with pytest.raises(ListError, match=f"1 to {MAX_LIST_URIS} URIs, not {total}"):
        Lists().upload("d", 0, total, ["s3://b/x"])


def test_a_list_longest_allowed_is_taken_and_so_is_a_list_of_one():
    assert Lists().upload("d", 0, MAX_LIST_URIS, ["s3://b/x"]) == 1
    lists = Lists()
    d = upload_whole(lists, ["s3://b/003"])
    assert positions(Manifest(MANIFEST).map(lists, d, 1)) == [3]


def test_more_uris_than_announced_or_uris_that_do_not_hash_to_the_digest_are_refused():
    lists, mine = Lists(), MANIFEST[:3]
    d = list_digest(mine)
    with pytest.raises(ListError, match=f"list {d}: more than the 2 URIs announced"):
        lists.upload(d, 0, 2, mine)
    with pytest.raises(ListError, match="do not hash to it"):
        lists.upload(d, 0, 3, mine[::-1])
    m = Manifest(MANIFEST)
    assert m.map(lists, d, 3) is None and lists._sizes == {}
    assert lists.upload(d, 0, 3, mine) == 3 and m.map(lists, d, 3) is not None


def test_at_most_max_lists_are_kept_least_recently_announced_dropped_first():
    m, lists = Manifest(MANIFEST), Lists()
    digests = [upload_whole(lists, MANIFEST[k:k + 2]) for k in range(MAX_LISTS)]
    for d in digests[1:] + digests[:1]:  # digests[0] announced again last: now the most recent
        assert m.map(lists, d, 2) is not None
    extra = upload_whole(lists, MANIFEST[7:9] + MANIFEST[:1])
    assert m.map(lists, digests[1], 2) is None  # the least recently announced went
    assert all(m.map(lists, d, 2) is not None for d in (digests[0], *digests[2:]))
    assert m.map(lists, extra, 3) is not None
    assert set(lists._maps) <= set(lists._uploaded) and set(lists._sizes) <= set(lists._uploaded)


def test_uploads_under_way_are_bounded_too():
    lists = Lists()
    starts = [MANIFEST[k:k + 3] for k in range(MAX_LISTS + 1)]
    for uris in starts:
        assert lists.upload(list_digest(uris), 0, 3, uris[:1]) == 1
    with pytest.raises(ListError, match="expected 0"):  # the oldest upload under way was dropped
        lists.upload(list_digest(starts[0]), 1, 3, starts[0][1:])
    for uris in starts[1:]:  # the MAX_LISTS newest are all still under way
        assert lists.upload(list_digest(uris), 1, 3, uris[1:]) == 3


def test_lists_share_a_byte_budget_and_older_lists_make_room(monkeypatch):
    monkeypatch.setattr(order, "MAX_LIST_BYTES", 3000)
    m, lists = Manifest(MANIFEST), Lists()
    a = [f"s3://b/a{i:02d}" for i in range(20)]  # ~1,300 bytes as the daemon estimates them
    b = [f"s3://b/b{i:02d}" for i in range(20)]
    c = [f"s3://b/c{i:02d}" for i in range(20)]
    da, db = upload_whole(lists, a), upload_whole(lists, b)
    assert m.map(lists, da, 20) is not None and m.map(lists, db, 20) is not None
    dc = upload_whole(lists, c)  # does not fit beside both: the oldest goes
    assert m.map(lists, da, 20) is None and m.map(lists, db, 20) is not None and m.map(lists, dc, 20)
    assert sum(lists._sizes.values()) <= 3000 and set(lists._sizes) == {db, dc}
    big = [f"s3://b/big{i:03d}" for i in range(60)]
    with pytest.raises(ListError, match="larger than the 0 MiB the daemon keeps for lists"):
        upload_whole(lists, big)
    assert da not in lists._sizes and list_digest(big) not in lists._sizes
    # everything else went to make room for it, and it did not fit either
    assert m.map(lists, db, 20) is None and m.map(lists, dc, 20) is None
    assert set(lists._maps) <= set(lists._uploaded)  # a dropped list's map goes with it
    with pytest.raises(ListError, match="expected 0"):  # the refused upload is not half kept
        lists.upload(list_digest(big), 60, 60, [])
    assert upload_whole(lists, a) == da and m.map(lists, da, 20) is not None


def test_an_upload_under_way_is_dropped_before_a_known_list(monkeypatch):
    monkeypatch.setattr(order, "MAX_LIST_BYTES", 3000)
    m, lists = Manifest(MANIFEST), Lists()
    a = [f"s3://b/a{i:02d}" for i in range(20)]
    b = [f"s3://b/b{i:02d}" for i in range(40)]
    c = [f"s3://b/c{i:02d}" for i in range(20)]
    da = upload_whole(lists, a)
    assert lists.upload(list_digest(b), 0, 40, b[:20]) == 20  # under way
    dc = upload_whole(lists, c)
    assert m.map(lists, da, 20) is not None and m.map(lists, dc, 20) is not None
    with pytest.raises(ListError, match="expected 0"):
        lists.upload(list_digest(b), 20, 40, b[20:])


def test_chunks_cover_the_list_in_order_within_both_limits():
    uris = [f"s3://b/{i}" for i in range(2 * LIST_CHUNK + 1)]
    got = list(chunks(uris))
    assert [o for o, _ in got] == [0, LIST_CHUNK, 2 * LIST_CHUNK]
    assert [len(c) for _, c in got] == [LIST_CHUNK, LIST_CHUNK, 1]
    assert [u for _, c in got for u in c] == uris
    assert list(chunks([])) == []


def test_chunks_of_long_keys_stay_under_the_byte_limit_and_a_huge_key_goes_alone():
    long = [f"s3://b/{'k' * 2000}{i}" for i in range(100)]
    got = list(chunks(long))
    per = (LIST_CHUNK_BYTES + 6 * len(long[0]) + 4) // (6 * len(long[0]) + 4)
    assert len(got[0][1]) == per and [u for _, c in got for u in c] == long
    assert all(6 * sum(len(u) for u in c) < LIST_CHUNK_BYTES + 6 * len(long[0]) + 4 * len(c) for _, c in got)
    huge = ["s3://b/" + "x" * LIST_CHUNK_BYTES, "s3://b/y"]
    assert [(o, len(c)) for o, c in chunks(huge)] == [(0, 1), (1, 1)]
    accents = ["s3://b/" + "é" * 200 + str(i) for i in range(1000)]  # 2 bytes each in UTF-8
    assert len(next(iter(chunks(accents)))[1]) < len(next(iter(chunks([u.replace("é", "e") for u in accents])))[1])


def test_a_list_map_remapped_onto_a_new_manifest():
    share = ListMap.share(10, 1, 3)  # 1, 4, 7
    moved = share.remapped(lambda p: None if p == 4 else 9 - p)
    assert positions(moved) == [8, None, 2] and moved.index(2) == 2 and moved.index(5) is None
    table = ListMap.from_uris(["s3://b/009", "s3://b/x"], POS.get)
    assert positions(table.remapped(lambda p: p - 1)) == [8, None]
    assert ListMap(3, start=2, step=2).index(8) is None and ListMap(3, start=2, step=2).index(6) == 2
    assert ListMap(3, start=2, step=2).index(0) is None and ListMap(3, start=2, step=2).index(3) is None


def test_a_list_sent_in_chunks_is_budgeted_for_all_of_them(monkeypatch):
    monkeypatch.setattr(order, "MAX_LIST_BYTES", 3000)
    lists = Lists()
    big = [f"s3://b/c{i:02d}" for i in range(60)]  # ~4,000 bytes in all, ~1,300 a chunk
    d = list_digest(big)
    assert lists.upload(d, 0, 60, big[:20]) == 20 and lists.upload(d, 20, 60, big[20:40]) == 40
    with pytest.raises(ListError, match="larger than"):
        lists.upload(d, 40, 60, big[40:])


def test_refused_chunks_leave_no_bytes_counted_against_the_budget(monkeypatch):
    monkeypatch.setattr(order, "MAX_LIST_BYTES", 3000)
    m, lists = Manifest(MANIFEST), Lists()
    a = [f"s3://b/a{i:02d}" for i in range(20)]
    b = [f"s3://b/b{i:02d}" for i in range(20)]
    x = [f"s3://b/x{i:02d}" for i in range(30)]
    assert lists.upload(list_digest(x), 0, 30, x[:10]) == 10
    with pytest.raises(ListError, match="expected 10"):
        lists.upload(list_digest(x), 20, 30, x[20:])
    y = x[:10]
    assert lists.upload(list_digest(y), 0, 8, y[:5]) == 5
    with pytest.raises(ListError, match="more than the 8 URIs announced"):
        lists.upload(list_digest(y), 5, 8, y[5:])
    # neither refused upload left bytes behind: two lists that fit the budget together both stay
    da, db = upload_whole(lists, a), upload_whole(lists, b)
    assert m.map(lists, da, 20) is not None and m.map(lists, db, 20) is not None


def test_the_byte_budget_is_named_in_mib(monkeypatch):
    monkeypatch.setattr(order, "MAX_LIST_BYTES", 2 << 20)
    uris = [f"s3://bucket/some/longer/prefix/for/the/keys/{i:08d}.tfrecord" for i in range(25_000)]
    with pytest.raises(ListError, match="larger than the 2 MiB the daemon keeps for lists"):
        Lists().upload("d", 0, len(uris), uris)


def test_chunks_stop_once_their_estimate_reaches_the_byte_limit():
    # 6 bytes a character plus 4: a 682-character URI is estimated at 4,096 bytes, 128 of them at the limit
    uris = ["s3://b/" + "k" * 675] * 200
    assert 6 * len(uris[0]) + 4 == 4096 and 128 * 4096 == LIST_CHUNK_BYTES
    assert [len(c) for _, c in chunks(uris)] == [128, 72]


def _estimate(uris: list[str]) -> int:
    """The bytes the daemon counts for a list: each URI object and its slot in the list."""
    import sys

    return sum(sys.getsizeof(u) + 8 for u in uris)


def test_lists_that_fill_the_budget_exactly_fit_and_one_byte_less_does_not(monkeypatch):
    a = [f"s3://b/a{i:02d}" for i in range(20)]
    b = [f"s3://b/b{i:02d}" for i in range(20)]
    m = Manifest(MANIFEST)
    monkeypatch.setattr(order, "MAX_LIST_BYTES", _estimate(a) + _estimate(b))
    lists = Lists()
    da, db = upload_whole(lists, a), upload_whole(lists, b)
    assert m.map(lists, da, 20) is not None and m.map(lists, db, 20) is not None
    monkeypatch.setattr(order, "MAX_LIST_BYTES", _estimate(a) + _estimate(b) - 1)
    lists = Lists()
    da, db = upload_whole(lists, a), upload_whole(lists, b)
    assert m.map(lists, da, 20) is None and m.map(lists, db, 20) is not None
    monkeypatch.setattr(order, "MAX_LIST_BYTES", _estimate(a))
    assert upload_whole(Lists(), a) == da  # alone, exactly the budget
    monkeypatch.setattr(order, "MAX_LIST_BYTES", _estimate(a) - 1)
    with pytest.raises(ListError, match="larger than"):
        upload_whole(Lists(), a)
