import hashlib
import uuid

import numpy as np
import pytest
from dagster import DagsterExecutionStepExecutionError, Failure
from sqlalchemy import select, text, update

from heimdex_assets.assets import scene_clip_embeddings, scene_text_embeddings
from heimdex_assets.db.tables import scene_clip_vectors, scene_text_vectors, scenes, text_embedding_cache
from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID
from heimdex_assets.runs import FORCE_TAG, OWNER_SCOPE_TAG
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import materialize_videos

VERSION = SPEC.step("scene_text").version


def text_rows(db, **where):
    q = select(scene_text_vectors).order_by(scene_text_vectors.c.scene_id, scene_text_vectors.c.channel)
    for col, value in where.items():
        q = q.where(scene_text_vectors.c[col] == value)
    with db.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(q)]


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def metadata(result):
    return {k: v.value for k, v in result.asset_materializations_for_node("scene_text_embeddings")[0].metadata.items()}


def test_one_vector_per_scene_and_enabled_channel(db, rows, resources, instance):
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    written = text_rows(db)
    assert len(written) == 3 * 2
    assert {r["channel"] for r in written} == {"transcript", "visual"}  # summary is disabled in the spec
    # The identity of a channel's input is the sha256 of exactly the text the model sees.
    with db.engine.connect() as conn:
        hashes = {}
        for r in conn.execute(select(scenes)):
            hashes[(r.id, "transcript")] = sha256(r.transcript.strip())
            hashes[(r.id, "visual")] = sha256(f"{r.visual_description.strip()}\nTags: {', '.join(r.tags)}")
    for r in written:
        assert r["step_version"] == VERSION and r["model_id"] == LOCAL_MODEL_ID and r["dimension"] == 384
        assert abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5
        assert r["input_sha256"] == hashes[(r["scene_id"], r["channel"])]


def test_text_vectors_match_the_model_on_the_rendered_text(db, rows, resources, instance, text_embedder):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    rows.scene(
        video,
        owner,
        0,
        transcript="  The ferry leaves at noon.  ",
        visual_description="A ferry",
        tags=["sea", "boat"],
    )
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    by_channel = {r["channel"]: r["embedding"] for r in text_rows(db)}
    expected = text_embedder.embed_texts(["The ferry leaves at noon.", "A ferry\nTags: sea, boat"]).vectors
    np.testing.assert_allclose(by_channel["transcript"], expected[0], atol=1e-5)
    np.testing.assert_allclose(by_channel["visual"], expected[1], atol=1e-5)


def test_rerun_and_multi_partition_runs_give_identical_rows(db, rows, resources, instance):
    owner = rows.owner()
    videos = [str(rows.video(owner, n_scenes=2)) for _ in range(3)]
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    together = text_rows(db)
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    assert text_rows(db) == together  # a second run changes nothing, created_at included
    with db.transaction() as conn:
        conn.execute(text("TRUNCATE scene_text_vectors"))
    for v in videos:
        materialize_videos([scene_text_embeddings], [v], resources, instance)
    strip = [{k: v for k, v in r.items() if k != "created_at"} for r in text_rows(db)]
    assert strip == [{k: v for k, v in r.items() if k != "created_at"} for r in together]


def test_same_text_is_embedded_once_and_reused_from_the_cache(db, rows, resources, instance):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    for i in range(3):
        rows.scene(video, owner, i, transcript="Exactly the same words.", visual_description=f"view {i}", tags=[])
    result = materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    meta = metadata(result)
    assert meta["texts_embedded"] == 4  # one transcript + three visual texts
    assert meta["rows_written"] == 6 and meta["items_computed"] == 6
    with db.engine.connect() as conn:
        assert conn.execute(select(text_embedding_cache)).rowcount == 4
    # A plain rerun computes nothing: every item already has a row of its current identity.
    again = metadata(materialize_videos([scene_text_embeddings], [str(video)], resources, instance))
    assert (again["items_computed"], again["items_unchanged"], again["texts_embedded"]) == (0, 6, 0)
    # A forced rerun recomputes every item, and every text comes from the cache.
    forced = materialize_videos([scene_text_embeddings], [str(video)], resources, instance, tags={FORCE_TAG: "true"})
    meta = metadata(forced)
    assert meta["items_computed"] == 6 and meta["texts_embedded"] == 0 and meta["reused_from_cache"] == 4


def test_an_edited_transcript_gets_a_new_vector(db, rows, resources, instance):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=2)
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    before = {(r["scene_id"], r["channel"]): r for r in text_rows(db)}
    target = next(iter(before))[0]
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == target).values(transcript="A completely new line."))
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    after = {(r["scene_id"], r["channel"]): r for r in text_rows(db)}
    assert after[(target, "transcript")]["input_sha256"] != before[(target, "transcript")]["input_sha256"]
    assert after[(target, "visual")] == before[(target, "visual")]
    unchanged = [k for k in before if k[0] != target]
    assert all(after[k] == before[k] for k in unchanged)


def test_a_removed_scene_and_a_blank_transcript_lose_their_vectors(db, rows, resources, instance):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=3)
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    ids = sorted({r["scene_id"] for r in text_rows(db)})
    with db.transaction() as conn:
        conn.execute(scenes.delete().where(scenes.c.id == ids[0]))
        conn.execute(update(scenes).where(scenes.c.id == ids[1]).values(transcript="   "))
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    left = {(r["scene_id"], r["channel"]) for r in text_rows(db)}
    assert left == {(ids[1], "visual"), (ids[2], "transcript"), (ids[2], "visual")}


def test_the_visual_text_is_the_trimmed_description_and_tags_and_its_sha_is_the_identity(
    db, rows, resources, instance, text_embedder
):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    scene = rows.scene(
        video, owner, 0, visual_description="\n  A red kite over the dunes.  \t", tags=["  a ", "", "   ", "b"]
    )
    result = materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    visual = text_rows(db, channel="visual")
    assert len(visual) == 1 and visual[0]["scene_id"] == scene
    exact = "A red kite over the dunes.\nTags: a, b"
    assert visual[0]["input_sha256"] == sha256(exact)
    np.testing.assert_allclose(visual[0]["embedding"], text_embedder.embed_texts([exact]).vectors[0], atol=1e-5)
    with db.engine.connect() as conn:  # the cache holds the vector of exactly that text
        cached = conn.execute(select(text_embedding_cache.c.text_sha256)).scalars().all()
    assert sha256(exact) in cached
    assert metadata(result)["items"] == 2  # transcript + visual


def test_a_transcript_cleared_to_whitespace_has_no_item_and_its_old_row_goes(db, rows, resources, instance):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=2)
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    before = {(r["scene_id"], r["channel"]): r for r in text_rows(db)}
    target = sorted(before)[0][0]
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == target).values(transcript=" \n\t  "))

    meta = metadata(materialize_videos([scene_text_embeddings], [str(video)], resources, instance))

    after = {(r["scene_id"], r["channel"]): r for r in text_rows(db)}
    assert set(after) == set(before) - {(target, "transcript")}
    assert all(after[k] == before[k] for k in after)  # the other rows are untouched, created_at included
    assert (meta["items"], meta["items_computed"], meta["items_unchanged"]) == (3, 0, 3)
    assert (meta["stray_rows_deleted"], meta["rows_written"], meta["failures"]) == (1, 0, 0)


def test_a_processing_video_is_skipped_with_a_message(db, rows, resources, instance):
    owner = rows.owner()
    ready = rows.video(owner, n_scenes=2)
    busy = rows.video(owner, n_scenes=2, status="PROCESSING")
    result = materialize_videos([scene_text_embeddings], [str(ready), str(busy)], resources, instance)
    assert {r["video_id"] for r in text_rows(db)} == {ready}
    meta = metadata(result)
    assert meta["partitions_skipped"] == {str(busy): f"video {busy} is PROCESSING, not READY: skipped"}
    assert meta["partitions"] == 1


def test_owner_isolation_other_owners_rows_stay_byte_identical(db, rows, resources, instance):
    a, b = rows.owner("a"), rows.owner("b")
    a_videos = [str(rows.video(a, n_scenes=2)) for _ in range(2)]
    b_video = str(rows.video(b, n_scenes=2))
    assets = [scene_text_embeddings, scene_clip_embeddings]
    materialize_videos(assets, [b_video], resources, instance)

    def b_state():
        with db.engine.connect() as conn:
            return [
                [tuple(r) for r in conn.execute(select(t).where(t.c.owner_id == b).order_by(*t.primary_key))]
                for t in (scene_text_vectors, scene_clip_vectors)
            ]

    before = b_state()
    materialize_videos(assets, a_videos, resources, instance, tags={OWNER_SCOPE_TAG: str(a), "heimdex/force": "true"})
    assert b_state() == before
    assert {r["owner_id"] for r in text_rows(db)} == {a, b}


def test_a_video_outside_the_runs_owner_scope_is_refused(db, rows, resources, instance):
    a, b = rows.owner("a"), rows.owner("b")
    mine, theirs = str(rows.video(a, n_scenes=1)), str(rows.video(b, n_scenes=1))
    with pytest.raises((Failure, DagsterExecutionStepExecutionError)) as err:
        materialize_videos([scene_text_embeddings], [mine, theirs], resources, instance, tags={OWNER_SCOPE_TAG: str(a)})
    assert f"video {theirs} is not in the scope of owner {a}" in str(err.value)
    assert {r["video_id"] for r in text_rows(db)} == {uuid.UUID(mine)}  # the in-scope video was done


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("not-a-uuid", "malformed video id 'not-a-uuid'"),
        (
            "3F2B8C1E-7D4A-4C3E-9A51-0B6E2F1D9C70",
            "is not canonical; use '3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70'",
        ),
        ("3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70", "unknown video 3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70"),
    ],
)
def test_bad_partition_keys_fail_with_a_clear_message(db, resources, instance, key, message):
    result = materialize_videos([scene_text_embeddings], [key], resources, instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    assert message in failure.message
    assert text_rows(db) == []
