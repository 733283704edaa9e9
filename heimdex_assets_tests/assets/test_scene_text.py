import hashlib
import uuid

import numpy as np
import pytest
from dagster import DagsterExecutionStepExecutionError, Failure
from sqlalchemy import select, text, update

from heimdex_assets.assets import scene_clip_embeddings, scene_text_embeddings
from heimdex_assets.db.tables import (
    embedding_failures,
    scene_clip_vectors,
    scene_text_vectors,
    scenes,
    text_embedding_cache,
)
from heimdex_assets.freshness import partition_states
from heimdex_assets.resources import TextEmbedder
from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID
from heimdex_assets.runs import FORCE_TAG, OWNER_SCOPE_TAG, RETRY_FAILED_TAG
from heimdex_assets.spec import SPEC
from heimdex_assets.steps import SCENE_TEXT
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.fake_openai import INVALID_INPUT_MESSAGE

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


# -- failure isolation: one text, one request, not the run ---------------------------------------------------

API_KEY = "sk-test-NEVER-LOG-THIS-0123456789"
OPENAI_MODEL = "text-embedding-3-small"


def openai_resources(resources, fake, **overrides) -> dict:
    embedder = TextEmbedder(
        provider="openai", openai_api_key=API_KEY, openai_base_url=fake.url, backoff_base_s=0.01, **overrides
    )
    return resources | {"text_embedder": embedder}


def scene_texts(db, rows, owner, video, n: int) -> dict[str, str]:
    """``n`` scenes with texts of their own; item id → the exact text the model is sent (by the step's items)."""
    for i in range(n):
        rows.scene(video, owner, i, transcript=f"Line {i} of the log.", visual_description=f"Pier {i}")
    with db.engine.connect() as conn:
        return {i.item_id: i.payload["text"] for i in SCENE_TEXT.items(conn, {"scene_text": OPENAI_MODEL}, [video])}


def scene_requests(fake, texts) -> list[list[str]]:
    """The requests that carried scene texts (not the evaluation gate's queries), in order."""
    return [r["input"] for r in fake.requests if set(r["input"]) & set(texts.values())]


def failure_rows(db) -> dict[str, str]:
    with db.engine.connect() as conn:
        return dict(conn.execute(select(embedding_failures.c.item_id, embedding_failures.c.reason)).all())


def cached_texts(db) -> set[str]:
    with db.engine.connect() as conn:
        return set(conn.execute(select(text_embedding_cache.c.text_sha256)).scalars())


def test_a_text_the_api_rejects_fails_alone_and_the_paid_vectors_are_reused(db, rows, resources, instance, fake_openai):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    texts = scene_texts(db, rows, owner, video, 4)  # 8 texts, sent 3 a request
    bad_item = sorted(texts)[4]
    fake_openai.invalid_inputs = {texts[bad_item]}
    resources = openai_resources(resources, fake_openai, max_inputs_per_request=3)

    meta = metadata(materialize_videos([scene_text_embeddings], [str(video)], resources, instance))

    # The rejected request was split until the bad text stood alone; every good text was paid for once.
    sent = scene_requests(fake_openai, texts)
    accepted = [t for r in sent if texts[bad_item] not in r for t in r]
    assert sorted(accepted) == sorted(t for k, t in texts.items() if k != bad_item)
    assert [texts[bad_item]] in sent and len(sent) <= 3 + 4
    reason = f"OpenAI rejected the input: HTTP 400: {INVALID_INPUT_MESSAGE}"
    assert (meta["failures"], meta["failure_reasons"]) == (1, {bad_item: reason})
    assert (meta["items_computed"], meta["rows_written"], meta["texts_embedded"]) == (8, 7, 7)
    assert failure_rows(db) == {bad_item: reason}
    assert API_KEY not in reason and "127.0.0.1" not in reason
    assert {f"{r['scene_id']}:{r['channel']}" for r in text_rows(db)} == set(texts) - {bad_item}
    assert cached_texts(db) == {sha256(t) for k, t in texts.items() if k != bad_item}
    with db.engine.connect() as conn:  # the failure shows: the partition is failed, in its backoff
        state = partition_states(conn, SCENE_TEXT, {"scene_text": OPENAI_MODEL})[str(video)]
    assert (state.state, state.failed_items) == ("failed", 1)

    # A forced rerun takes the 7 good vectors from the cache, sends nothing, and leaves the failed item to
    # its backoff.
    fake_openai.requests.clear()
    again = metadata(
        materialize_videos([scene_text_embeddings], [str(video)], resources, instance, tags={FORCE_TAG: "true"})
    )
    assert scene_requests(fake_openai, texts) == []
    assert (again["reused_from_cache"], again["texts_embedded"], again["items_waiting_for_retry"]) == (7, 0, 1)

    # Once the API takes it, retrying the failed item sends that text alone and the partition is fresh.
    fake_openai.invalid_inputs.clear()
    fake_openai.requests.clear()
    retried = metadata(
        materialize_videos([scene_text_embeddings], [str(video)], resources, instance, tags={RETRY_FAILED_TAG: "1"})
    )
    assert scene_requests(fake_openai, texts) == [[texts[bad_item]]]
    assert (retried["items_computed"], retried["failures"], retried["rows_written"]) == (1, 0, 1)
    assert failure_rows(db) == {}
    with db.engine.connect() as conn:
        assert partition_states(conn, SCENE_TEXT, {"scene_text": OPENAI_MODEL})[str(video)].state == "fresh"


def test_a_request_that_fails_after_every_retry_fails_only_its_texts(db, rows, resources, instance, fake_openai):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    texts = scene_texts(db, rows, owner, video, 3)  # 6 texts, 2 a request
    fake_openai.script = [(500, {})] * 2  # the first request, and its one retry
    resources = openai_resources(resources, fake_openai, max_inputs_per_request=2, max_retries=1)

    meta = metadata(materialize_videos([scene_text_embeddings], [str(video)], resources, instance))

    first = scene_requests(fake_openai, texts)[0]
    failed = {k for k, t in texts.items() if t in first}
    reason = "OpenAI embeddings failed after 2 attempts: HTTP 500: scripted 500"
    assert meta["failure_reasons"] == dict.fromkeys(sorted(failed), reason) and meta["failures"] == 2
    assert (meta["api_requests"], meta["api_retries"], meta["rows_written"]) == (4, 1, 4)
    assert {f"{r['scene_id']}:{r['channel']}" for r in text_rows(db)} == set(texts) - failed
    assert failure_rows(db) == dict.fromkeys(failed, reason)


def test_after_requests_fail_in_a_row_the_rest_is_not_sent(db, rows, resources, instance, fake_openai):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    texts = scene_texts(db, rows, owner, video, 3)
    fake_openai.script = [(503, {})] * 20  # the API is down
    resources = openai_resources(
        resources, fake_openai, max_inputs_per_request=1, max_retries=0, max_failed_requests_in_a_row=2
    )
    meta = metadata(materialize_videos([scene_text_embeddings], [str(video)], resources, instance))
    assert len(scene_requests(fake_openai, texts)) == 2
    reasons = set(meta["failure_reasons"].values())
    assert meta["failures"] == 6 and text_rows(db) == []
    assert reasons == {
        "OpenAI embeddings failed after 1 attempts: HTTP 503: scripted 503",
        "not sent: 2 requests in a row failed after every retry",
    }


def test_vectors_paid_for_before_the_run_fails_stay_cached(db, rows, resources, instance, fake_openai):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    texts = scene_texts(db, rows, owner, video, 2)  # 4 texts, 2 a request

    def revoke_key_after_the_first_request(inputs: list[str]) -> None:
        if len(fake_openai.requests) == 2:
            fake_openai.script.append((401, {}))

    fake_openai.on_request = revoke_key_after_the_first_request
    resources = openai_resources(resources, fake_openai, max_inputs_per_request=2)
    result = materialize_videos([scene_text_embeddings], [str(video)], resources, instance, raise_on_error=False)

    # A misconfigured provider fails the run (every text would fail alike), not the items one by one...
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error.cause.message
    assert "OpenAI embeddings failed: HTTP 401: scripted 401" in error and API_KEY not in error
    assert text_rows(db) == [] and failure_rows(db) == {}
    # ...but the first request's vectors were cached as they came: the rerun does not pay for them again.
    first = fake_openai.requests[0]["input"]
    assert cached_texts(db) == {sha256(t) for t in first}
    fake_openai.on_request = None
    fake_openai.requests.clear()
    meta = metadata(materialize_videos([scene_text_embeddings], [str(video)], resources, instance))
    assert [sorted(r) for r in scene_requests(fake_openai, texts)] == [sorted(set(texts.values()) - set(first))]
    assert (meta["reused_from_cache"], meta["texts_embedded"], meta["rows_written"]) == (2, 2, 4)
