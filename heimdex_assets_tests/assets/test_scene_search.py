"""``scene_search_index`` against the real database and each search backend (OpenSearch, SQLite FTS5)."""

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from opensearchpy import OpenSearch
from sqlalchemy import select, text, update

from heimdex_assets.assets.scene_search import scene_search_index
from heimdex_assets.db.tables import embedding_failures, scene_search_documents, scenes
from heimdex_assets.freshness import partition_states
from heimdex_assets.models import expected_models
from heimdex_assets.resources.search_index import SearchIndex, index_mapping
from heimdex_assets.runs import OWNER_SCOPE_TAG
from heimdex_assets.spec import SPEC
from heimdex_assets.steps import SCENE_SEARCH
from heimdex_assets_tests.conftest import OPENSEARCH_URL, materialize_videos
from heimdex_assets_tests.resources.test_search_index import reconfigured, writes_blocked_for

VERSION = SPEC.step("scene_search").version
OLD = "2025-01-01"


@pytest.fixture
def run_resources(resources, search_index):
    return resources | {"search_index": search_index}


def search_states(db, resources, search_index, person_detector) -> dict[str, object]:
    """Each READY video's search-step state, under the models the deployment expects (the index's identity)."""
    everything = resources | {"search_index": search_index, "person_detector": person_detector}
    with db.engine.connect() as conn:
        return partition_states(conn, SCENE_SEARCH, expected_models(conn, everything))


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


def jsonb_text(value: object) -> str:
    """PostgreSQL's text of a ``jsonb`` value: object keys by length, then bytes; ", " and ": " between;
    a float8 as a number without a trailing ".0" (the test's times are exact)."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {jsonb_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, ensure_ascii=False)


def canonical_sha256(doc: dict) -> str:
    """A document's identity: the sha256 of its canonical JSON (PostgreSQL's jsonb text)."""
    return hashlib.sha256(jsonb_text(doc).encode()).hexdigest()


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
    identity = search_index.index_identity(VERSION)
    assert identity.startswith(f"{'opensearch' if search_index.opensearch_url else 'sqlite'}:")
    assert identity.split("@")[0].endswith(f":{search_index.index_name(VERSION)}")
    for scene_id, row in written.items():
        assert row["input_sha256"] == canonical_sha256(expected[str(scene_id)])
        assert (row["video_id"], row["owner_id"]) == (video, owner)
        # The ledger names the index that holds the document, and which one of that name (its identity).
        assert (row["index_name"], row["model_id"]) == (search_index.index_name(VERSION), identity)
    # The only READY video is indexed: the index is complete and the alias points at it.
    assert search_index.active_version() == VERSION
    meta = metadata(result)
    assert meta["partitions"] == 1 and meta["documents_upserted"] == 4 and meta["documents_deleted"] == 0
    assert (meta["items"], meta["items_computed"], meta["rows_written"], meta["failures"]) == (4, 4, 4, 0)
    assert meta["bulk_retries"] == 0 and meta["complete"] is True and meta["model_id"] == identity
    assert meta["index"] == search_index.index_name(VERSION) and meta["alias_active_version"] == VERSION


def test_a_removed_scene_loses_its_document(
    db, rows, resources, run_resources, instance, search_index, person_detector
):
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_search_index], [str(video)], run_resources, instance)
    gone = scene_rows(db, video)[1].id
    with db.transaction() as conn:
        conn.execute(scenes.delete().where(scenes.c.id == gone))
    # Its ledger row went with the scene (foreign key), its document did not (it lives in the index):
    # the partition is stale until it is rerun.
    assert gone not in ledger(db) and len(ledger(db)) == 2
    assert set(search_index.get_documents(VERSION, [str(gone)])) == {str(gone)}
    state = search_states(db, resources, search_index, person_detector)[str(video)]
    assert (state.state, state.items, state.stale_items) == ("stale", 2, 0)

    result = materialize_videos([scene_search_index], [str(video)], run_resources, instance)

    assert search_index.get_documents(VERSION, [str(gone)]) == {}
    assert search_index.count(VERSION) == 2
    assert gone not in ledger(db) and len(ledger(db)) == 2
    meta = metadata(result)
    assert (meta["documents_deleted"], meta["items_computed"], meta["items_unchanged"]) == (1, 0, 2)
    assert search_states(db, resources, search_index, person_detector)[str(video)].state == "fresh"


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
    # Documents already in this index with their current identity are not sent again.
    assert meta["documents_upserted"] == 0 and meta["documents_deleted"] == 0 and meta["partitions"] == 2
    assert (meta["items"], meta["items_unchanged"], meta["items_computed"], meta["rows_written"]) == (6, 6, 0, 0)


def test_the_alias_moves_only_when_the_new_index_is_complete(db, rows, run_resources, instance, search_index):
    owner = rows.owner()
    first, second = rows.video(owner, n_scenes=2), rows.video(owner, n_scenes=2)
    rows.video(owner, n_scenes=2, status="PROCESSING")  # never indexed, and never waited for
    # Searches read an older version's index, complete for these videos, as an earlier deployment left it.
    search_index.ensure_index(OLD)
    search_index.upsert_documents(OLD, [expected_document(r) for r in scene_rows(db) if r.video_id in (first, second)])
    search_index.activate(OLD)
    edited = scene_rows(db, first)[0].id
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == edited).values(transcript="a quokka smiles"))

    half = metadata(materialize_videos([scene_search_index], [str(first)], run_resources, instance))
    assert (half["complete"], half["alias_active_version"]) == (False, OLD)
    assert search_index.active_version() == OLD
    assert search_index.count(VERSION) == 2 and len(ledger(db)) == 2
    assert search_index.search(str(owner), "quokka", limit=5) == []  # searches still read the old index

    full = metadata(materialize_videos([scene_search_index], [str(second)], run_resources, instance))
    assert (full["complete"], full["alias_active_version"]) == (True, VERSION)
    assert search_index.active_version() == VERSION
    assert [h.scene_id for h in search_index.search(str(owner), "quokka", limit=5)] == [str(edited)]

    # Nothing left to do: indexing again keeps the alias where it is.
    again = metadata(materialize_videos([scene_search_index], [str(second)], run_resources, instance))
    assert (again["alias_active_version"], again["documents_upserted"]) == (VERSION, 0)
    assert search_index.versions() == [OLD, VERSION]


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

        # A refused document is a failure of its scene, recorded with its reason; every other is indexed.
        assert result.success
        meta = metadata(result)
        reason = meta["failure_reasons"][str(refused)]
        assert meta["failures"] == 1 and reason.startswith(f"not indexed in {prefix}-{VERSION}: ")
        assert "mapper_parsing_exception" in reason
        with db.engine.connect() as conn:
            (failure,) = conn.execute(select(embedding_failures)).all()
        assert (failure.step, failure.item_id, failure.partition_id) == ("scene_search", str(refused), broken_video)
        assert (failure.reason, failure.attempts, failure.model_id) == (reason, 1, index.index_identity(VERSION))
        written = ledger(db)
        assert refused not in written and {r["video_id"] for r in written.values()} == {broken_video, good_video}
        good = [str(r.id) for r in scene_rows(db) if r.id != refused]
        assert set(index.get_documents(VERSION, good)) == set(good) and len(good) == 4
        assert index.get_documents(VERSION, [str(refused)]) == {}
        # A failed item does not hold the generation back (it waits for its backoff): the index serves.
        assert index.active_version() == VERSION
        assert meta["complete"] is True
    finally:
        client.indices.delete(index=f"{prefix}-*")


def wipe(search_index: SearchIndex) -> SearchIndex:
    """The version's index deleted behind the product's back (a lost cluster, a deleted file); the
    handle to use afterwards (for SQLite, a new one: the file is new)."""
    if search_index.opensearch_url:
        OpenSearch(hosts=[OPENSEARCH_URL]).indices.delete(index=search_index.index_name(VERSION))
        return search_index
    path = Path(search_index.sqlite_path)
    for f in path.parent.glob(path.name + "*"):  # with its -wal and -shm files
        f.unlink()
    return reconfigured(search_index)


def test_a_wiped_index_makes_every_partition_missing_and_one_run_restores_it(
    db, rows, resources, instance, search_index, person_detector
):
    owner = rows.owner()
    videos = [rows.video(owner, n_scenes=2) for _ in range(2)]
    keys = [str(v) for v in videos]
    materialize_videos([scene_search_index], keys, resources | {"search_index": search_index}, instance)
    before = search_index.index_identity(VERSION)
    states = search_states(db, resources, search_index, person_detector)
    assert {k: s.state for k, s in states.items()} == dict.fromkeys(keys, "fresh")

    search_index = wipe(search_index)

    assert search_index.index_identity(VERSION) is None
    states = search_states(db, resources, search_index, person_detector)
    assert {k: (s.state, s.items) for k, s in states.items()} == dict.fromkeys(keys, ("missing", 2))

    result = materialize_videos([scene_search_index], keys, resources | {"search_index": search_index}, instance)

    identity = search_index.index_identity(VERSION)
    assert identity is not None and identity != before  # a new index of the same name
    states = search_states(db, resources, search_index, person_detector)
    assert {k: s.state for k, s in states.items()} == dict.fromkeys(keys, "fresh")
    expected = {str(r.id): expected_document(r) for r in scene_rows(db)}
    assert search_index.get_documents(VERSION, list(expected)) == expected and len(expected) == 4
    assert search_index.active_version() == VERSION
    assert len(search_index.search(str(owner), "harbour", limit=10)) == 4
    assert {r["model_id"] for r in ledger(db).values()} == {identity}  # the old index's rows went
    meta = metadata(result)
    assert (meta["items_computed"], meta["documents_upserted"], meta["complete"]) == (4, 4, True)


def wait_for_blocked_write(db, table: str, run: threading.Thread, timeout_s: float = 120.0) -> None:
    """Until another session waits for a lock on ``table`` (the run's write), or fail."""
    deadline = time.monotonic() + timeout_s
    query = text(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE c.relname = :t AND NOT l.granted AND l.pid <> pg_backend_pid()"
    )
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            if conn.execute(query, {"t": table}).scalar_one():
                return
        assert run.is_alive(), "the run ended without writing"
        time.sleep(0.05)
    raise AssertionError(f"no write to {table} waited for the lock within {timeout_s} s")


def test_an_edit_committed_between_the_runs_read_and_its_write_leaves_the_partition_stale(
    db, rows, resources, run_resources, instance, search_index, person_detector
):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=2)
    key = str(video)
    materialize_videos([scene_search_index], [key], run_resources, instance)
    edited = scene_rows(db, video)[0].id
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == edited).values(transcript="The ferry leaves at noon."))

    # Another session holds the ledger table against writes (reads pass): the run reads its items,
    # indexes them, then waits to write; meanwhile the scene is edited again and committed.
    outcome: dict[str, object] = {}
    run = threading.Thread(
        target=lambda: outcome.update(result=materialize_videos([scene_search_index], [key], run_resources, instance))
    )
    blocker = db.engine.connect()
    held = blocker.begin()
    try:
        blocker.execute(text("LOCK TABLE scene_search_documents IN EXCLUSIVE MODE"))
        run.start()
        wait_for_blocked_write(db, "scene_search_documents", run)
        blocker.execute(update(scenes).where(scenes.c.id == edited).values(transcript="The ferry leaves at dusk."))
        held.commit()
    finally:
        if held.is_active:
            held.rollback()
        blocker.close()
        run.join(timeout=300)
    assert not run.is_alive() and outcome["result"].success

    # The run wrote what it read (noon); the scene says dusk since: stale, not fresh.
    assert search_index.get_documents(VERSION, [str(edited)])[str(edited)]["transcript"] == "The ferry leaves at noon."
    state = search_states(db, resources, search_index, person_detector)[key]
    assert (state.state, state.items, state.stale_items) == ("stale", 2, 1)

    result = materialize_videos([scene_search_index], [key], run_resources, instance)

    assert metadata(result)["items_computed"] == 1
    assert search_states(db, resources, search_index, person_detector)[key].state == "fresh"
    (row,) = scene_rows(db, video)[:1]
    assert search_index.get_documents(VERSION, [str(edited)]) == {str(edited): expected_document(row)}
    assert ledger(db)[edited]["input_sha256"] == canonical_sha256(expected_document(row))
    assert [h.scene_id for h in search_index.search(str(owner), "dusk", limit=5)] == [str(edited)]
