"""The search index resource against a real OpenSearch node and a real SQLite FTS5 file."""

import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from opensearchpy import OpenSearch

from heimdex_assets.resources.search_index import BulkIndexError, SearchIndex, SearchIndexError
from heimdex_assets_tests.conftest import OPENSEARCH_URL

V1, V2 = "2026-01-06", "2099-01-01"


@contextmanager
def writes_blocked_for(search_index: SearchIndex, version: str, seconds: float) -> Iterator[None]:
    """Make the version's index refuse writes now, and accept them again after ``seconds``.

    OpenSearch: the index setting ``index.blocks.write``. SQLite: another connection holds the
    file's write lock (the resource's busy timeout must be shorter than ``seconds``).
    """
    name = search_index.index_name(version)
    locked = threading.Event()
    if search_index.opensearch_url:
        client = OpenSearch(hosts=[OPENSEARCH_URL])
        client.indices.put_settings(index=name, body={"index.blocks.write": True})

        def hold() -> None:
            locked.set()
            time.sleep(seconds)
            client.indices.put_settings(index=name, body={"index.blocks.write": None})

    else:

        def hold() -> None:
            conn = sqlite3.connect(search_index.sqlite_path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
            conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    locked.wait(10)
    try:
        yield
    finally:
        holder.join()


def reconfigured(search_index: SearchIndex, **changes: object) -> SearchIndex:
    """The same index under other settings: a new resource, with its own client or connections."""
    return SearchIndex(**(search_index.model_dump() | changes))


def doc(owner: str, video: str, index: int, transcript: str, **fields: object) -> dict:
    return {
        "owner_id": owner,
        "video_id": video,
        "scene_id": str(uuid.uuid4()),
        "scene_index": index,
        "start_s": index * 10.0,
        "end_s": index * 10.0 + 9.5,
        "transcript": transcript,
        "visual_description": f"A wide shot of boats number {index} at dawn.",
        "tags": ["boats", "harbour"],
        "summary": None,
    } | fields


FILLER = [
    "The narrator explains how the tide turns at the harbour before sunrise.",
    "Fishermen unload their nets while gulls circle above the quay.",
    "A storm gathers over the bay and the ferry waits at the pier.",
    "Children run along the beach chasing a red kite in the wind.",
]


@pytest.fixture
def owner() -> str:
    return str(uuid.uuid4())


def test_documents_are_stored_as_given_and_counted_per_owner(search_index, owner):
    video = str(uuid.uuid4())
    docs = [doc(owner, video, i, t) for i, t in enumerate(FILLER)]
    other = doc(str(uuid.uuid4()), str(uuid.uuid4()), 0, "someone else's scene")
    search_index.ensure_index(V1)

    report = search_index.upsert_documents(V1, [*docs, other])

    assert (report.documents, report.indexed, report.attempts, report.retries, report.failed) == (5, 5, 1, 0, {})
    stored = search_index.get_documents(V1, [d["scene_id"] for d in docs])
    assert stored == {d["scene_id"]: d for d in docs}
    assert search_index.count(V1) == 5 and search_index.count(V1, owner) == 4
    assert search_index.index_name(V1) == f"{search_index.index_prefix}-{V1}"

    # Upserting again replaces documents by id: no duplicates, the new text is stored.
    changed = docs[0] | {"transcript": "Rewritten transcript."}
    search_index.upsert_documents(V1, [changed])
    assert search_index.count(V1) == 5
    assert search_index.get_documents(V1, [changed["scene_id"]])[changed["scene_id"]] == changed


def test_bm25_finds_a_rare_word_and_ranks_two_mentions_above_one(search_index, owner):
    video = str(uuid.uuid4())
    docs = [doc(owner, video, i, t) for i, t in enumerate(FILLER)]
    once = doc(owner, video, 10, "At noon a lone narwhal surfaces near the old lighthouse keeper.")
    twice = doc(owner, video, 11, "At noon a narwhal surfaces, then a second narwhal near the keeper.")
    search_index.ensure_index(V1)
    search_index.upsert_documents(V1, [*docs, once, twice])
    search_index.activate(V1)

    hits = search_index.search(owner, "narwhal", limit=10)

    assert [h.scene_id for h in hits] == [twice["scene_id"], once["scene_id"]]
    assert hits[0].score > hits[1].score > 0
    assert "<em>narwhal</em>" in hits[0].snippet and hits[0].video_id == video
    # Stemmed english text: the plural finds it too, and words of tags are searched.
    assert {h.scene_id for h in search_index.search(owner, "Narwhals!", limit=10)} == {
        once["scene_id"],
        twice["scene_id"],
    }
    assert len(search_index.search(owner, "harbour", limit=100)) == 6
    assert len(search_index.search(owner, "harbour", limit=2)) == 2


def test_a_search_never_returns_another_owners_scene(search_index, owner):
    intruder = str(uuid.uuid4())
    mine = doc(owner, str(uuid.uuid4()), 0, "the secret okapi project")
    theirs = [doc(intruder, str(uuid.uuid4()), i, "okapi okapi okapi, the okapi everywhere") for i in range(3)]
    search_index.ensure_index(V1)
    search_index.upsert_documents(V1, [mine, *theirs])
    search_index.activate(V1)

    assert [h.scene_id for h in search_index.search(owner, "okapi", limit=10)] == [mine["scene_id"]]
    # Even naming the other owner's videos does not reach them.
    assert search_index.search(owner, "okapi", limit=10, video_ids=[t["video_id"] for t in theirs]) == []
    assert {h.scene_id for h in search_index.search(intruder, "okapi", limit=10)} == {t["scene_id"] for t in theirs}
    assert search_index.search(str(uuid.uuid4()), "okapi", limit=10) == []


def test_search_reads_only_the_active_version(search_index, owner):
    video = str(uuid.uuid4())
    old = doc(owner, video, 0, "an albatross glides")
    new = old | {"transcript": "a cormorant dives"}
    for version, d in ((V1, old), (V2, new)):
        search_index.ensure_index(version)
        search_index.upsert_documents(version, [d])

    assert search_index.active_version() is None
    assert search_index.search(owner, "albatross", limit=5) == []  # nothing active: nothing found

    search_index.activate(V1)
    assert search_index.active_version() == V1
    assert [h.scene_id for h in search_index.search(owner, "albatross", limit=5)] == [old["scene_id"]]
    assert search_index.search(owner, "cormorant", limit=5) == []

    search_index.activate(V2)
    assert search_index.active_version() == V2
    assert search_index.search(owner, "albatross", limit=5) == []
    assert [h.scene_id for h in search_index.search(owner, "cormorant", limit=5)] == [new["scene_id"]]
    assert search_index.versions() == [V1, V2]

    with pytest.raises(SearchIndexError, match="is the active search index"):
        search_index.drop_version(V2)
    search_index.drop_version(V1)
    assert search_index.versions() == [V2] and search_index.count(V1) == 0
    with pytest.raises(SearchIndexError, match="no such index"):
        search_index.activate(V1)
    assert search_index.active_version() == V2


def test_deleting_documents_of_videos(search_index, owner):
    video_a, video_b = str(uuid.uuid4()), str(uuid.uuid4())
    a = [doc(owner, video_a, i, t) for i, t in enumerate(FILLER)]
    b = [doc(owner, video_b, i, t) for i, t in enumerate(FILLER)]
    for version in (V1, V2):
        search_index.ensure_index(version)
        search_index.upsert_documents(version, [*a, *b])

    # Scenes a[1] and a[3] were removed from video a: only they go, and only at V1.
    kept = [a[0]["scene_id"], a[2]["scene_id"]]
    assert search_index.delete_video_documents_except(V1, [video_a], kept) == 2
    assert set(search_index.get_documents(V1, [d["scene_id"] for d in a])) == set(kept)
    assert search_index.count(V1) == 6 and search_index.count(V2) == 8
    assert search_index.delete_video_documents_except(V1, [video_a], kept) == 0

    # A deleted video loses its documents in one version, or in all.
    assert search_index.delete_videos(V2, [video_b]) == 4
    assert search_index.count(V2) == 4 and search_index.count(V1) == 6
    assert search_index.delete_videos(None, [video_a, video_b]) == 2 + 4 + 4
    assert search_index.count(V1) == search_index.count(V2) == 0


def test_items_refused_while_writes_are_blocked_are_retried_until_they_land(search_index, owner):
    video = str(uuid.uuid4())
    docs = [doc(owner, video, i, t) for i, t in enumerate(FILLER)]
    search_index.ensure_index(V1)
    patient = reconfigured(search_index, timeout_s=0.2, bulk_retries=4, bulk_backoff_s=0.3)

    with writes_blocked_for(search_index, V1, seconds=1.0):
        report = patient.upsert_documents(V1, docs)

    assert report.attempts > 1 and report.retries >= len(docs) and report.failed == {}
    assert search_index.get_documents(V1, [d["scene_id"] for d in docs]) == {d["scene_id"]: d for d in docs}


def test_items_still_refused_after_every_retry_are_reported(search_index, owner):
    docs = [doc(owner, str(uuid.uuid4()), i, t) for i, t in enumerate(FILLER[:2])]
    search_index.ensure_index(V1)
    impatient = reconfigured(search_index, timeout_s=0.2, bulk_retries=1, bulk_backoff_s=0.1)

    with writes_blocked_for(search_index, V1, seconds=2.0), pytest.raises(BulkIndexError) as raised:
        impatient.upsert_documents(V1, docs)

    report = raised.value.report
    assert report.attempts == 2 and set(report.failed) == {d["scene_id"] for d in docs}
    for d in docs:
        assert d["scene_id"] in str(raised.value)
    assert "2 of 2 document(s) could not be indexed" in str(raised.value)
    expected = "cluster_block_exception" if search_index.opensearch_url else "database is locked"
    assert all(expected in reason for reason in report.failed.values())


def test_a_document_violating_the_mapping_is_reported_by_id_and_the_others_land(search_index, owner):
    video = str(uuid.uuid4())
    good = [doc(owner, video, i, t) for i, t in enumerate(FILLER[:3])]
    bad = doc(owner, video, 3, "broken", scene_index="abc")
    search_index.ensure_index(V1)

    with pytest.raises(BulkIndexError) as raised:
        search_index.upsert_documents(V1, [good[0], bad, *good[1:]])

    report = raised.value.report
    assert list(report.failed) == [bad["scene_id"]] and bad["scene_id"] in str(raised.value)
    assert report.attempts == 1  # a malformed document would fail the same way again: not retried
    assert "scene_index" in report.failed[bad["scene_id"]]
    assert set(search_index.get_documents(V1, [d["scene_id"] for d in [*good, bad]])) == {d["scene_id"] for d in good}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_opensearch_is_named_without_its_credentials():
    port = _free_port()
    index = SearchIndex(opensearch_url=f"http://admin:s3cret-pw@127.0.0.1:{port}", bulk_retries=1, bulk_backoff_s=0.01)

    with pytest.raises(SearchIndexError) as raised:
        index.ensure_index(V1)
    assert str(raised.value) == f"cannot reach OpenSearch at http://127.0.0.1:{port}: ConnectionError"

    with pytest.raises(BulkIndexError) as raised:
        index.upsert_documents(V1, [doc(str(uuid.uuid4()), str(uuid.uuid4()), 0, "x")])
    assert "cannot reach OpenSearch" in str(raised.value) and raised.value.report.attempts == 2
    for message in (str(raised.value), index.describe()):
        assert "s3cret" not in message and "admin" not in message


@pytest.mark.parametrize("version", ["", "Upper", "a b", "../x", "-lead"])
def test_an_invalid_version_is_refused_before_any_request(tmp_path, version):
    with pytest.raises(ValueError, match="invalid search index version"):
        SearchIndex(sqlite_path=str(tmp_path / "s.sqlite")).ensure_index(version)


def test_the_index_identity_names_the_index_that_exists_now(search_index, owner):
    assert search_index.index_identity(V1) is None  # read-only: asking does not create it
    assert search_index.versions() == []

    search_index.ensure_index(V1)
    first = search_index.index_identity(V1)
    backend = "opensearch" if search_index.opensearch_url else "sqlite"
    assert first is not None and first.startswith(f"{backend}:{search_index.index_name(V1)}@")
    assert len(first.rsplit("@", 1)[1]) >= 16
    assert search_index.index_identity(V2) is None  # another version: another index, not there

    # Stable while the index lives: asked again, after writes, after ensure_index, from another resource.
    assert search_index.index_identity(V1) == first
    search_index.upsert_documents(V1, [doc(owner, str(uuid.uuid4()), i, t) for i, t in enumerate(FILLER)])
    search_index.ensure_index(V1)
    assert search_index.index_identity(V1) == first
    assert reconfigured(search_index).index_identity(V1) == first
    if search_index.opensearch_url:  # the test node ignores credentials; the identity must not carry them
        with_password = search_index.opensearch_url.replace("://", "://admin:s3cret-pw@", 1)
        assert reconfigured(search_index, opensearch_url=with_password).index_identity(V1) == first

    # Wiped and created again under the same name: another identity, and not the other version's.
    search_index.drop_version(V1)
    assert search_index.index_identity(V1) is None
    search_index.ensure_index(V1)
    second = search_index.index_identity(V1)
    assert second is not None and second != first
    search_index.ensure_index(V2)
    assert search_index.index_identity(V2) not in (None, first, second)

    for identity in (first, second):
        assert "http" not in identity and "@127" not in identity and "9250" not in identity
        assert "s3cret" not in identity and "admin" not in identity
        assert str(search_index.sqlite_path or "/nowhere") not in identity


def test_an_sqlite_file_from_before_identities_gets_them_once(tmp_path):
    path = tmp_path / "old.sqlite"
    SearchIndex(sqlite_path=str(path)).ensure_index(V1)
    with sqlite3.connect(path) as conn:  # as the file was before identities were kept
        conn.execute("DROP TABLE heimdex_index_ids")
    conn.close()

    upgraded = SearchIndex(sqlite_path=str(path)).index_identity(V1)
    assert upgraded is not None and upgraded.startswith(f"sqlite:heimdex-scenes-{V1}@")
    assert SearchIndex(sqlite_path=str(path)).index_identity(V1) == upgraded


def test_the_identity_of_an_unreachable_opensearch_is_a_one_line_error_without_credentials():
    port = _free_port()
    index = SearchIndex(opensearch_url=f"http://admin:s3cret-pw@127.0.0.1:{port}")

    with pytest.raises(SearchIndexError) as raised:
        index.index_identity(V1)
    assert str(raised.value) == f"cannot reach OpenSearch at http://127.0.0.1:{port}: ConnectionError"
