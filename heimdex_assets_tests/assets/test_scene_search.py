"""``scene_search_index`` against the real database and each search backend (OpenSearch, SQLite FTS5)."""

import hashlib
import json
import uuid

import pytest
from opensearchpy import OpenSearch
from sqlalchemy import select, update

from heimdex_assets.assets.scene_search import index_video_run, scene_search_index
from heimdex_assets.assets.video_runs import OWNER_SCOPE_TAG, load_video_run
from heimdex_assets.db.tables import scene_search_documents, scenes
from heimdex_assets.resources.search_index import SearchIndex, index_mapping
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import OPENSEARCH_URL, materialize_videos
from heimdex_assets_tests.resources.test_search_index import reconfigured, writes_blocked_for

VERSION = SPEC.step("scene_search").version
NEXT = "2099-01-01"


@pytest.fixture
def run_resources(resources, search_index):
    return resources | {"search_index": search_index}


def scene_rows(db, video=None):
    q = select(scenes).order_by(scenes.c.video_id, scenes.c.scene_index)
    if video is not None:
        q = q.where(scenes.c.video_id == video)
    with db.engine.connect() as conn:
        return list(conn.execute(q))


def ledger(db, version=VERSION):
    q = select(scene_search_documents).where(scene_search_documents.c.step_version == version)
    with db.engine.connect() as conn:
        return {r.scene_id: r._asdict() for r in conn.execute(q)}


def expected_document(row) -> dict:
    """What the index must hold for a scene row."""
    return {
        "owner_id": str(row.owner_id),
        "video_id": str(row.video_id),
        "scene_id": str(row.id),
        "scene_index": row.scene_index,
        "start_s": row.start_s,
        "end_s": row.end_s,
        "transcript": row.transcript,
        "visual_description": row.visual_description,
        "tags": list(row.tags),
        "summary": row.summary,
    }


def canonical_sha256(doc: dict) -> str:
    return hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()


def metadata(result):
    return {k: v.value for k, v in result.asset_materializations_for_node("scene_search_index")[0].metadata.items()}


def test_one_document_per_scene_equal_to_the_scene_rows(db, rows, run_resources, instance, search_index):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=3)
    summarised = rows.scene(video, owner, 3, summary="The crew repairs the mast.", tags=[])

    result = materialize_videos([scene_search_index], [str(video)], run_resources, instance)

    expected = {str(r.id): expected_document(r) for r in scene_rows(db, video)}
    assert search_index.get_documents(VERSION, list(expected)) == expected
    assert search_index.count(VERSION) == 4
    written = ledger(db)
    assert set(written) == {uuid.UUID(i) for i in expected} and summarised in written
    for scene_id, row in written.items():
        assert row["input_sha256"] == canonical_sha256(expected[str(scene_id)])
        assert (row["video_id"], row["owner_id"]) == (video, owner)
        assert row["index_name"] == search_index.index_name(VERSION)
    # The only READY video is indexed: the index is complete and the alias points at it.
    assert search_index.active_version() == VERSION
    meta = metadata(result)
    assert meta["videos"] == 1 and meta["documents_upserted"] == 4 and meta["documents_deleted"] == 0
    assert meta["bulk_retries"] == 0 and meta["complete"] is True
    assert meta["index"] == search_index.index_name(VERSION) and meta["alias_active_version"] == VERSION


def test_a_removed_scene_loses_its_document(db, rows, run_resources, instance, search_index):
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_search_index], [str(video)], run_resources, instance)
    gone = scene_rows(db, video)[1].id
    with db.transaction() as conn:
        conn.execute(scenes.delete().where(scenes.c.id == gone))

    result = materialize_videos([scene_search_index], [str(video)], run_resources, instance)

    assert search_index.get_documents(VERSION, [str(gone)]) == {}
    assert search_index.count(VERSION) == 2
    assert gone not in ledger(db) and len(ledger(db)) == 2
    assert metadata(result)["documents_deleted"] == 1


def test_an_edited_transcript_is_reindexed_and_found(db, rows, run_resources, instance, search_index):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=2)
    materialize_videos([scene_search_index], [str(video)], run_resources, instance)
    before = ledger(db)
    edited = scene_rows(db, video)[0].id
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == edited).values(transcript="A pelican steals a sandwich."))

    materialize_videos([scene_search_index], [str(video)], run_resources, instance)

    after = ledger(db)
    assert after[edited]["input_sha256"] != before[edited]["input_sha256"]
    other = next(s for s in before if s != edited)
    assert after[other] == before[other]  # untouched, indexed_at included
    assert [h.scene_id for h in search_index.search(owner, "pelican", limit=5)] == [str(edited)]


def test_bm25_finds_a_scene_by_a_rare_word_and_ranks_more_mentions_higher(
    db,
    rows,
    run_resources,
    instance,
    search_index,
):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=4)
    once = rows.scene(video, owner, 4, transcript="Near the pier a walrus naps beside the old lighthouse keeper.")
    twice = rows.scene(video, owner, 5, transcript="Near the pier a walrus naps, then a walrus yawns at the keeper.")
    materialize_videos([scene_search_index], [str(video)], run_resources, instance)

    hits = search_index.search(owner, "walrus", limit=10)

    assert [h.scene_id for h in hits] == [str(twice), str(once)]
    assert hits[0].score > hits[1].score
    assert all(h.video_id == str(video) and "<em>walrus</em>" in h.snippet for h in hits)
    assert len(search_index.search(owner, "harbour", limit=50)) == 6  # a tag of every scene


def test_owners_never_see_each_others_scenes(db, rows, run_resources, instance, search_index):
    alice, bob = rows.owner("alice"), rows.owner("bob")
    alice_video = rows.video(alice, n_scenes=0)
    bob_video = rows.video(bob, n_scenes=0)
    mine = rows.scene(alice_video, alice, 0, transcript="the tapir crosses the river")
    theirs = [rows.scene(bob_video, bob, i, transcript="tapir tapir tapir, a tapir again") for i in range(3)]
    materialize_videos([scene_search_index], [str(alice_video), str(bob_video)], run_resources, instance)

    assert [h.scene_id for h in search_index.search(str(alice), "tapir", limit=10)] == [str(mine)]
    assert search_index.search(str(alice), "tapir", limit=10, video_ids=[str(bob_video)]) == []
    assert {h.scene_id for h in search_index.search(str(bob), "tapir", limit=10)} == {str(t) for t in theirs}

    # A run scoped to alice that names bob's video writes nothing of bob's and fails naming it.
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.video_id == bob_video).values(transcript="changed by bob"))
    before = ledger(db)
    result = materialize_videos(
        [scene_search_index],
        [str(bob_video)],
        run_resources,
        instance,
        tags={OWNER_SCOPE_TAG: str(alice)},
        raise_on_error=False,
    )
    assert not result.success
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert f"video {bob_video} is not in the scope of owner {alice}" in message
    assert ledger(db) == before
    assert {d["transcript"] for d in search_index.get_documents(VERSION, [str(t) for t in theirs]).values()} == {
        "tapir tapir tapir, a tapir again"
    }


def test_a_second_run_changes_nothing(db, rows, run_resources, instance, search_index):
    owner = rows.owner()
    keys = [str(rows.video(owner, n_scenes=3)) for _ in range(2)]
    materialize_videos([scene_search_index], keys, run_resources, instance)
    first_ledger = ledger(db)
    ids = [str(s) for s in first_ledger]
    first_docs = search_index.get_documents(VERSION, ids)

    result = materialize_videos([scene_search_index], keys, run_resources, instance)

    assert ledger(db) == first_ledger and len(first_ledger) == 6
    assert search_index.get_documents(VERSION, ids) == first_docs
    assert search_index.count(VERSION) == 6 and search_index.active_version() == VERSION
    meta = metadata(result)
    assert meta["documents_upserted"] == 6 and meta["documents_deleted"] == 0 and meta["videos"] == 2


def test_the_alias_moves_only_when_the_new_index_is_complete(db, rows, run_resources, instance, search_index):
    owner = rows.owner()
    first, second = rows.video(owner, n_scenes=2), rows.video(owner, n_scenes=2)
    rows.video(owner, n_scenes=2, status="PROCESSING")  # never indexed, and never waited for
    materialize_videos([scene_search_index], [str(first), str(second)], run_resources, instance)
    assert search_index.active_version() == VERSION
    edited = scene_rows(db, first)[0].id
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == edited).values(transcript="a quokka smiles"))

    def index_at_next_version(video):
        with db.engine.connect() as conn:
            run = load_video_run(conn, [str(video)])
        return index_video_run(db, search_index, run, NEXT)

    half = index_at_next_version(first)
    assert (half.complete, half.alias_active_version) == (False, VERSION)
    assert search_index.active_version() == VERSION
    assert search_index.count(NEXT) == 2 and len(ledger(db, NEXT)) == 2
    assert search_index.search(str(owner), "quokka", limit=5) == []  # searches still read the old index

    full = index_at_next_version(second)
    assert (full.complete, full.alias_active_version) == (True, NEXT)
    assert search_index.active_version() == NEXT
    assert [h.scene_id for h in search_index.search(str(owner), "quokka", limit=5)] == [str(edited)]

    # Nothing left to do: indexing again keeps the alias where it is.
    assert index_at_next_version(second).alias_active_version == NEXT
    assert search_index.versions() == [VERSION, NEXT]


def test_writes_refused_for_a_while_are_retried_by_the_asset(db, rows, resources, instance, search_index):
    video = rows.video(rows.owner(), n_scenes=3)
    search_index.ensure_index(VERSION)
    patient = reconfigured(search_index, timeout_s=0.2, bulk_retries=6, bulk_backoff_s=0.2)

    # Long enough to outlast the run's start-up, short enough for the retries (6.2 s of backoff).
    with writes_blocked_for(search_index, VERSION, seconds=3.0):
        result = materialize_videos([scene_search_index], [str(video)], resources | {"search_index": patient}, instance)

    assert metadata(result)["bulk_retries"] >= 3
    expected = {str(r.id): expected_document(r) for r in scene_rows(db, video)}
    assert search_index.get_documents(VERSION, list(expected)) == expected
    assert len(ledger(db)) == 3


def test_a_document_refused_for_good_fails_only_its_video(db, rows, resources, instance):
    """An index whose mapping is too narrow (``scene_index`` a byte, say) refuses one scene for good."""
    prefix = f"heimdex-test-{uuid.uuid4().hex[:12]}"
    client = OpenSearch(hosts=[OPENSEARCH_URL])
    mapping = index_mapping(prefix, VERSION)
    mapping["mappings"]["properties"]["scene_index"] = {"type": "byte"}
    client.indices.create(index=f"{prefix}-{VERSION}", body=mapping)
    try:
        index = SearchIndex(opensearch_url=OPENSEARCH_URL, index_prefix=prefix, bulk_retries=1, bulk_backoff_s=0.1)
        owner = rows.owner()
        broken_video, good_video = rows.video(owner, n_scenes=2), rows.video(owner, n_scenes=2)
        refused = rows.scene(broken_video, owner, 200)  # out of a byte's range

        result = materialize_videos(
            [scene_search_index],
            [str(broken_video), str(good_video)],
            resources | {"search_index": index},
            instance,
            raise_on_error=False,
        )

        assert not result.success
        message = result.get_step_failure_events()[0].event_specific_data.error.message
        assert f"{broken_video}: 1 document(s) not indexed in {prefix}-{VERSION}" in message
        assert str(refused) in message and "mapper_parsing_exception" in message
        assert {r["video_id"] for r in ledger(db).values()} == {good_video}
        good = [str(r.id) for r in scene_rows(db, good_video)]
        assert set(index.get_documents(VERSION, good)) == set(good)
        assert index.active_version() is None  # incomplete: nothing to switch to
    finally:
        client.indices.delete(index=f"{prefix}-*")
