"""Generations: search keeps answering from the active generation while the next one is built beside it,
flips to it once it covers every partition, and rolls back exactly."""

from datetime import timedelta

import pytest
from sqlalchemy import text

from heimdex_assets.assets import scene_text_embeddings
from heimdex_assets.freshness import partition_states
from heimdex_assets.generations import ActivationError, activate, active_generations, prune, rollback
from heimdex_assets.models import expected_models, record_models
from heimdex_assets.resources import SearchIndex, TextEmbedder
from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID
from heimdex_assets.search import search_scenes
from heimdex_assets.steps import SCENE_TEXT
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.fake_openai import FakeOpenAI

QUERIES = ("the tide turns at the harbour", "boats at dawn", "the narrator explains")
OPENAI_MODEL = "text-embedding-3-small"


@pytest.fixture
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()


def results(db, resources, owner, embedder):
    return {
        q: [r.scene_id for r in search_scenes(db, owner, q, mode="semantic", text_embedder=embedder, **resources)]
        for q in QUERIES
    }


def test_search_serves_the_active_generation_while_the_next_is_built_then_flips_and_rolls_back(
    db, rows, resources, instance, tmp_path, fake_openai
):
    owner = rows.owner()
    videos = [str(rows.video(owner, n_scenes=3)) for _ in range(4)]
    search = {"clip": resources["clip"], "search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite"))}
    local = resources["text_embedder"]
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    with db.engine.connect() as conn:
        assert active_generations(conn)["scene_text"].key == (SCENE_TEXT.version, LOCAL_MODEL_ID)
    before = results(db, search, owner, local)
    assert all(before.values())

    # The deployment moves to another text model; the new generation is built beside the old one.
    openai = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url)
    with db.transaction() as conn:
        record_models(conn, {"scene_text": OPENAI_MODEL}, "test")
    new = resources | {"text_embedder": openai}
    materialize_videos([scene_text_embeddings], videos[:2], new, instance)
    # Half built: searches, even from a process configured for the new model, read the old generation.
    assert results(db, search, owner, openai) == before
    with db.transaction() as conn, pytest.raises(ActivationError, match=r"2 stale of 4.*--force"):
        activate(conn, SCENE_TEXT, expected_models(conn, new | search), actor="test", reason="too early")
    with db.engine.connect() as conn:
        assert active_generations(conn)["scene_text"].model_id == LOCAL_MODEL_ID

    materialize_videos([scene_text_embeddings], videos[2:], new, instance)  # complete: it flips by itself
    with db.engine.connect() as conn:
        assert active_generations(conn)["scene_text"].key == (SCENE_TEXT.version, OPENAI_MODEL)
        counted = dict(
            conn.execute(
                text("SELECT model_id, count(*) FROM scene_text_vectors GROUP BY model_id ORDER BY model_id")
            ).all()
        )
    assert counted == {LOCAL_MODEL_ID: 24, OPENAI_MODEL: 24}  # both generations kept, side by side
    after = results(db, search, owner, openai)
    assert after != before and all(after.values())

    with db.transaction() as conn:
        assert rollback(conn, "scene_text", actor="test", reason="worse").model_id == LOCAL_MODEL_ID
    assert results(db, search, owner, openai) == before  # exactly the old results, old query model too
    with db.transaction() as conn:
        flipped = activate(conn, SCENE_TEXT, expected_models(conn, new | search), actor="test", reason="again")
    assert flipped.model_id == OPENAI_MODEL
    assert results(db, search, owner, openai) == after
    with db.engine.connect() as conn:
        events = conn.execute(
            text("SELECT action, model_id, actor FROM generation_events WHERE step = 'scene_text' ORDER BY id")
        ).all()
    assert [(e.action, e.model_id) for e in events] == [
        ("activate", LOCAL_MODEL_ID),
        ("activate", OPENAI_MODEL),
        ("rollback", LOCAL_MODEL_ID),
        ("activate", OPENAI_MODEL),
    ]


def test_rollback_without_a_previous_generation_is_refused(db):
    with db.transaction() as conn, pytest.raises(ActivationError, match="no previous generation"):
        rollback(conn, "scene_clip", actor="test", reason="none")


def test_prune_deletes_exactly_the_expired_generations_rows_never_the_active_or_previous(
    db, rows, resources, instance, tmp_path, fake_openai
):
    owner = rows.owner()
    videos = [str(rows.video(owner, n_scenes=2)) for _ in range(3)]
    search = {"search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite"))}
    materialize_videos([scene_text_embeddings], videos, resources, instance)  # A: local, active
    for model in (OPENAI_MODEL, "text-embedding-ada-002"):  # B, then C: A retired, B previous, C active
        embedder = TextEmbedder(
            provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url, openai_model=model
        )
        with db.transaction() as conn:
            record_models(conn, {"scene_text": model}, "test")
        current = resources | {"text_embedder": embedder}
        materialize_videos([scene_text_embeddings], videos, current, instance)

    def per_model():
        with db.engine.connect() as conn:
            return dict(conn.execute(text("SELECT model_id, count(*) FROM scene_text_vectors GROUP BY 1")).all())

    before = per_model()
    assert before == {LOCAL_MODEL_ID: 12, OPENAI_MODEL: 12, "text-embedding-ada-002": 12}
    with db.engine.connect() as conn:
        models = expected_models(conn, current | search)
    assert prune(db, search["search_index"], models) == []  # A retired just now: within the grace period
    assert per_model() == before
    report = prune(db, search["search_index"], models, grace=timedelta(0))
    assert [(r["step"], r["model_id"], r["rows_deleted"]) for r in report] == [("scene_text", LOCAL_MODEL_ID, 12)]
    assert per_model() == {OPENAI_MODEL: 12, "text-embedding-ada-002": 12}
    with db.engine.connect() as conn:
        ledger_models = set(
            conn.execute(text("SELECT DISTINCT model_id FROM partition_ledger WHERE step = 'scene_text'")).scalars()
        )
        assert ledger_models == {OPENAI_MODEL, "text-embedding-ada-002"}
        states = partition_states(conn, SCENE_TEXT, models)
    # Pruning is no change to the generations kept: every partition stays fresh, without a recount.
    assert {s.state for s in states.values()} == {"fresh"}
    assert prune(db, search["search_index"], models, grace=timedelta(0)) == []  # B (previous) and C stay
