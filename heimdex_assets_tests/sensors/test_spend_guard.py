"""The spend guard: the stale sensor launches a plan on its own only under the day's OpenAI ceiling; above it
the plan waits, is shown by `heimdex status`, and approval launches exactly it."""

import uuid

import dagster as dg
import pytest
from sqlalchemy import func, select, update

from heimdex_assets.assets import OWNER_ASSETS, VIDEO_ASSETS
from heimdex_assets.db.tables import partition_ledger, reprocess_plans, scenes
from heimdex_assets.models import expected_models, record_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess, run_plan
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.spend_guard import (
    MAX_TOKENS_ENV,
    MAX_USD_ENV,
    SpendCeiling,
    SpendGuardError,
    approve,
    waiting_plan,
)
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.sensors.test_stale_partitions import backfill_of, tick

OPENAI_MODEL = "text-embedding-3-small"


@pytest.fixture
def run_resources(resources, tmp_path):
    return resources | {
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite")),
        "person_detector": OpenCvPersonDetector(),
    }


@pytest.fixture
def corpus(rows, run_resources, instance):
    """An owner with three videos, every asset materialised with the local text model."""
    owner = rows.owner()
    videos = sorted(str(rows.video(owner, 2)) for _ in range(3))
    materialize_videos(VIDEO_ASSETS, videos, run_resources, instance)
    instance.add_dynamic_partitions("owners", [str(owner)])
    dg.materialize(OWNER_ASSETS, partition_key=str(owner), resources=run_resources, instance=instance)
    return owner, videos


@pytest.fixture
def openai_resources(db, run_resources, fake_openai):
    """The deployment moved to an OpenAI text model (`heimdex models use`): every text partition is stale."""
    embedder = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url)
    with db.transaction() as conn:
        record_models(conn, {"scene_text": embedder.model_id}, "test")
    return run_resources | {"text_embedder": embedder}


def whole_plan(db, resources):
    with db.engine.connect() as conn:
        return plan_reprocess(conn, ReprocessRequest(scope="all"), expected_models(conn, resources))


def plan_rows(db) -> list[tuple[str, int]]:
    with db.engine.connect() as conn:
        q = select(reprocess_plans.c.status, reprocess_plans.c.estimated_tokens).order_by(reprocess_plans.c.created_at)
        return [tuple(r) for r in conn.execute(q)]


def written_partitions(db, step: str, model_id: str) -> set[str]:
    with db.engine.connect() as conn:
        q = select(partition_ledger.c.partition_id).where(
            partition_ledger.c.step == step, partition_ledger.c.model_id == model_id
        )
        return {str(p) for p in conn.execute(q).scalars()}


def test_a_plan_over_the_ceiling_waits_and_approval_launches_exactly_it(
    db, corpus, openai_resources, instance, monkeypatch, fake_openai
):
    _, videos = corpus
    plan = whole_plan(db, openai_resources)
    tokens = plan.estimated_openai_tokens
    assert tokens > 0 and sorted(plan.assets["scene_text_embeddings"].partitions) == videos
    monkeypatch.setenv(MAX_TOKENS_ENV, str(tokens - 1))

    result = tick(instance, openai_resources)

    # Nothing launched; the plan is recorded, waiting, with the estimate and exactly the stale partitions.
    assert not result.run_requests
    with db.engine.connect() as conn:
        waiting = waiting_plan(conn)
    assert waiting is not None and waiting.created_by == "stale_partitions_sensor"
    assert waiting.estimated_tokens == tokens
    # The text model changed: text vectors are stale, not the lexical index (it holds no vectors).
    text_version = plan.assets["scene_text_embeddings"].step_version
    assert waiting.assets == {
        "scene_text_embeddings": {"step_version": text_version, "model_id": OPENAI_MODEL, "partitions": videos}
    }
    assert result.skip_message.startswith(f"plan {waiting.id} (3 asset partitions, estimated {tokens:,} tokens")
    assert f"over {tokens - 1:,} tokens a day ({MAX_TOKENS_ENV}" in result.skip_message
    assert f"`heimdex approve {waiting.id}`" in result.skip_message
    assert fake_openai.requests == []  # estimating sends nothing

    # The next tick sees the same plan: it records nothing new and launches nothing.
    again = tick(instance, openai_resources)
    assert not again.run_requests and again.skip_message == result.skip_message
    assert plan_rows(db) == [("waiting", tokens)]

    # Approval launches exactly the recorded partitions (here in this process, as `heimdex approve --sync`).
    launched: list = []

    def launch(p):
        launched.append({k: a.partitions for k, a in p.assets.items() if a.partitions})
        run_plan(p, openai_resources, instance)
        return []

    with db.engine.connect() as conn:
        models = expected_models(conn, openai_resources)
    approved = approve(db.engine, waiting.id, "test:operator", models, launch)
    assert launched == [{"scene_text_embeddings": videos}]
    assert (approved.status, approved.approved_by) == ("launched", "test:operator")
    assert written_partitions(db, "scene_text", OPENAI_MODEL) == set(videos)
    assert tick(instance, openai_resources).skip_message == "every partition is fresh"

    # Approving it again launches nothing twice.
    with pytest.raises(SpendGuardError, match=f"plan {waiting.id} is launched: only a waiting plan can be approved"):
        approve(db.engine, waiting.id, "test:operator", models, launch)
    assert len(launched) == 1


def test_a_plan_under_the_ceiling_launches_by_itself_and_counts_against_the_day(
    db, corpus, openai_resources, instance, monkeypatch
):
    _, videos = corpus
    tokens = whole_plan(db, openai_resources).estimated_openai_tokens
    monkeypatch.setenv(MAX_TOKENS_ENV, str(tokens))  # exactly the plan: it fits

    result = tick(instance, openai_resources)

    assert {tuple(backfill_of(r)[1]) for r in result.run_requests} == {tuple(videos)}
    assert plan_rows(db) == [("launched", tokens)]
    with db.engine.connect() as conn:
        assert waiting_plan(conn) is None

    # The plan runs (the backfill daemon's work, done here); then an edit makes one text stale again, and the
    # day's ceiling being spent, its plan waits.
    for request in result.run_requests:
        assets, keys = backfill_of(request)
        chosen = [a for a in VIDEO_ASSETS if a.key.to_user_string() in assets]
        materialize_videos(chosen, keys, openai_resources, instance)
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.video_id == uuid.UUID(videos[0])).values(transcript="A brand new line.")
        )
    held = tick(instance, openai_resources)
    assert not held.run_requests and "waits for approval" in held.skip_message
    assert f"last 24 h: {tokens:,} tokens" in held.skip_message
    assert [s for s, _ in plan_rows(db)] == ["launched", "waiting"]


def test_a_local_model_costs_nothing_and_is_never_held(db, corpus, run_resources, instance, monkeypatch):
    _, videos = corpus
    monkeypatch.setenv(MAX_USD_ENV, "0")
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.video_id == uuid.UUID(videos[1])).values(transcript="Edited."))
    (request,) = tick(instance, run_resources).run_requests
    assert backfill_of(request) == ({"scene_text_embeddings", "scene_search_index"}, [videos[1]])
    with db.engine.connect() as conn:
        (count,) = conn.execute(select(func.count()).select_from(reprocess_plans)).one()
    assert count == 1 and plan_rows(db) == [("launched", 0)]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (MAX_TOKENS_ENV, "lots", f"{MAX_TOKENS_ENV} must be a whole number of tokens, got 'lots'"),
        (MAX_USD_ENV, "-1", f"{MAX_USD_ENV} must be 0 or more, got '-1'"),
        (MAX_USD_ENV, "five", f"{MAX_USD_ENV} must be a number of dollars, got 'five'"),
    ],
)
def test_a_malformed_ceiling_is_named(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as err:
        SpendCeiling.from_env()
    assert str(err.value) == message
