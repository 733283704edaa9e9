import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from heimdex_assets import reprocess
from heimdex_assets.assets import scene_clip_embeddings, scene_search_index, scene_text_embeddings
from heimdex_assets.cli import main
from heimdex_assets.db.tables import scene_text_vectors, scenes, videos
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import (
    AssetPlan,
    ReprocessError,
    ReprocessPlan,
    ReprocessRequest,
    partition_groups,
    plan_reprocess,
    run_plan,
)
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex
from heimdex_assets.resources.clip_embedder import TINY_MODEL
from heimdex_assets.tokens import count_tokens, shipped_encoding
from heimdex_assets_tests.conftest import materialize_videos

VIDEO_ASSETS = [scene_text_embeddings, scene_clip_embeddings, scene_search_index]
OPENAI = "text-embedding-3-small"


@pytest.fixture
def world(db, rows, resources, instance, tmp_path, clip, text_embedder):
    a, b = rows.owner("a"), rows.owner("b")
    vids = {a: [rows.video(a, 2) for _ in range(2)], b: [rows.video(b, 2)]}
    resources = resources | {
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite")),
        "person_detector": OpenCvPersonDetector(),
    }
    keys = [str(v) for vs in vids.values() for v in vs]
    materialize_videos(VIDEO_ASSETS, keys, resources, instance)
    with db.engine.connect() as conn:
        models = expected_models(conn, resources)
    return a, b, vids, resources, models


def plan(db, models, **kw):
    with db.engine.connect() as conn:
        return plan_reprocess(conn, ReprocessRequest(**kw), models)


def test_an_edited_transcript_plans_exactly_its_video_for_text_and_search(db, world):
    a, _, vids, _, models = world
    assert plan(db, models, scope="all").assets["scene_text_embeddings"].partitions == []
    edited = vids[a][1]
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id == edited, scenes.c.scene_index == 0)
            .values(transcript="The lighthouse keeper polished the lens at dusk.")
        )
    p = plan(db, models | {"scene_text": OPENAI}, scope="all")
    assert p.assets["scene_search_index"].partitions == [str(edited)]
    assert p.assets["scene_clip_embeddings"].partitions == []
    # Against another model every text partition is stale; the estimate counts texts not cached for it.
    assert len(p.assets["scene_text_embeddings"].partitions) == 3
    assert p.estimated_openai_tokens > count_tokens(["The lighthouse keeper polished the lens at dusk."], OPENAI)[0]
    assert p.estimated_openai_cost_usd == pytest.approx(p.estimated_openai_tokens / 1e6 * 0.02)
    p = plan(db, models, scope="all")
    assert p.assets["scene_text_embeddings"].partitions == [str(edited)]
    assert p.assets["scene_text_embeddings"].items_stale == 1


def test_scopes_force_and_since(db, world):
    a, b, vids, _, models = world
    owner_plan = plan(db, models, scope="owner", owner_id=a, force=True)
    assert owner_plan.owner_scope == a
    assert sorted(owner_plan.assets["scene_clip_embeddings"].partitions) == sorted(str(v) for v in vids[a])
    assert owner_plan.assets["person_photo_embeddings"].partitions == [str(a)]
    video_plan = plan(db, models, scope="video", video_id=vids[b][0], force=True)
    assert video_plan.owner_scope == b and video_plan.video_count == 1
    assert video_plan.assets["person_photo_embeddings"].partitions == []
    later = datetime.now(UTC) + timedelta(hours=1)
    with db.transaction() as conn:
        conn.execute(update(videos).where(videos.c.id == vids[a][0]).values(updated_at=later))
    since_plan = plan(db, models, scope="all", since=later - timedelta(minutes=1), force=True)
    assert since_plan.assets["scene_clip_embeddings"].partitions == [str(vids[a][0])]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"scope": "video"}, "scope video needs a video id"),
        ({"scope": "owner"}, "scope owner needs an owner id"),
        ({"scope": "owner", "owner_id": uuid.UUID(int=7)}, f"owner {uuid.UUID(int=7)} not found"),
    ],
)
def test_requests_that_cannot_be_planned(db, world, kw, message):
    with pytest.raises(ReprocessError, match=message):
        plan(db, world[4], **kw)


def test_another_owners_video_is_not_found_in_an_owner_scope(db, world):
    a, b, vids, _, models = world
    with pytest.raises(ReprocessError, match=f"video {vids[b][0]} not found for owner {a}"):
        plan(db, models, scope="video", video_id=vids[b][0], owner_id=a)


def test_running_an_owner_plan_redoes_its_partitions_and_leaves_the_other_owner_alone(db, world, instance):
    a, b, vids, resources, models = world
    with db.transaction() as conn:
        conn.execute(text("DELETE FROM scene_text_vectors WHERE owner_id = :a"), {"a": a})

    def b_rows():
        with db.engine.connect() as conn:
            return conn.execute(
                select(scene_text_vectors)
                .where(scene_text_vectors.c.owner_id == b)
                .order_by(scene_text_vectors.c.scene_id, scene_text_vectors.c.channel)
            ).all()

    before = b_rows()
    p = plan(db, models, scope="owner", owner_id=a)
    assert sorted(p.assets["scene_text_embeddings"].partitions) == sorted(str(v) for v in vids[a])
    outcomes = run_plan(p, resources, instance)
    assert all(o.success for runs in outcomes.values() for o in runs)
    assert plan(db, models, scope="owner", owner_id=a).assets["scene_text_embeddings"].partitions == []
    assert b_rows() == before
    runs = instance.get_runs()
    assert {r.tags.get("heimdex/owner_id") for r in runs if "heimdex/owner_id" in r.tags} == {str(a)}


def test_an_asset_is_grouped_with_the_steps_it_reads_so_one_run_orders_them():
    request = ReprocessRequest(scope="all")
    assets = {
        "scene_text_embeddings": AssetPlan("scene_text_embeddings", "v", "m", ["v1", "v2"]),
        "scene_search_index": AssetPlan("scene_search_index", "v", "m", ["v1", "v2"]),
        "scene_clip_embeddings": AssetPlan("scene_clip_embeddings", "v", "m", ["v3"]),
        "person_photo_embeddings": AssetPlan("person_photo_embeddings", "v", "m", ["o1"]),
        "person_query_embeddings": AssetPlan("person_query_embeddings", "v", "m", ["o2"]),
    }
    groups = {
        (g.partitioning, tuple(g.partitions), tuple(sorted(g.asset_keys)))
        for g in partition_groups(ReprocessPlan(request, None, 3, assets))
    }
    assert groups == {
        ("video", ("v1", "v2"), ("scene_search_index", "scene_text_embeddings")),
        ("video", ("v3",), ("scene_clip_embeddings",)),
        # Query vectors read photo vectors: one group over both owners, photos first within each run.
        ("owner", ("o1", "o2"), ("person_photo_embeddings", "person_query_embeddings")),
    }


def test_a_step_redoes_only_itself_and_what_reads_it_and_says_what_it_left_stale(
    db, world, instance, capsys, monkeypatch, database_url, tiny_clip_checkpoint, tmp_path
):
    a, _, vids, resources, models = world
    edited, rethumbed = vids[a]
    with db.transaction() as conn:  # stale text (and search document) in one video, stale CLIP in another
        conn.execute(
            update(scenes).where(scenes.c.video_id == edited, scenes.c.scene_index == 0).values(transcript="Tide out.")
        )
        conn.execute(update(scenes).where(scenes.c.video_id == rethumbed).values(thumbnail_sha256="f" * 64))

    p = plan(db, models, scope="all", steps=("scene_text",))
    assert p.assets["scene_text_embeddings"].partitions == [str(edited)]
    # Nothing reads the text vectors: search documents and CLIP are left, and counted as left.
    left = {k: (a.partitions, a.partitions_left) for k, a in p.assets.items() if not a.selected}
    assert left["scene_clip_embeddings"] == ([], 1)
    assert left["scene_search_index"] == ([], 1)
    assert set(left) == {k for k in p.assets if k != "scene_text_embeddings"}
    downstream = plan(db, models, scope="all", steps=("person_photo",))
    assert {k for k, a in downstream.assets.items() if a.selected} == {
        "person_photo_embeddings",
        "person_query_embeddings",
    }

    assert all(o.success for runs in run_plan(p, resources, instance).values() for o in runs)
    after = plan(db, models, scope="all")
    assert after.assets["scene_text_embeddings"].partitions == []
    assert after.assets["scene_clip_embeddings"].partitions == [str(rethumbed)]
    assert after.assets["scene_search_index"].partitions == [str(edited)]

    # The command says the same, for the step it was given and the ones it left out.
    for name in ("OPENAI_API_KEY", "HEIMDEX_OPENSEARCH_URL"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "HEIMDEX_DATABASE_URL": database_url,
        "HEIMDEX_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
        "HEIMDEX_TEXT_PROVIDER": "local",
        "HEIMDEX_CLIP_MODEL": TINY_MODEL,
        "HEIMDEX_CLIP_CHECKPOINT": str(tiny_clip_checkpoint),
        "HEIMDEX_SEARCH_SQLITE_PATH": str(tmp_path / "scenes.sqlite"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.video_id == edited, scenes.c.scene_index == 1).values(transcript="Tide in.")
        )
    code = main(["reprocess", "--scope", "all", "--asset", "scene_text_embeddings", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "scene_clip_embeddings: 1 partitions stale, not redone (not selected)" in out
    assert "scene_search_index: 1 partitions stale, not redone (not selected)" in out
    assert out.count("not redone (not selected)") == 5
    assert any(
        line.split()[:3] == ["scene_text_embeddings", p.assets["scene_text_embeddings"].step_version, "1"]
        for line in out.splitlines()
    )


def test_an_unknown_step_is_refused_naming_the_valid_ones(db, world):
    with pytest.raises(ReprocessError) as err:
        plan(db, world[4], scope="all", steps=("scene_txt",))
    assert str(err.value) == (
        "unknown step 'scene_txt'; steps (and their assets): scene_text (scene_text_embeddings), "
        "scene_clip (scene_clip_embeddings), scene_person (scene_person_embeddings), "
        "scene_search (scene_search_index), person_photo (person_photo_embeddings), "
        "person_query (person_query_embeddings)"
    )


# Texts whose cl100k_base tokens no bytes rule predicts: Korean, emoji, digits, code, runs of spaces.
FIXED_TEXTS = [
    "The lighthouse keeper polished the lens at dusk.",
    "등대지기는 해질녘에 렌즈를 닦았다.",
    "🚢⚓ 12345678 boats, 3.14159 knots",
    "def f(x):\n    return x ** 2  # squared",
    "many     spaces   and\ttabs\n\nthen   more",
    "The lighthouse keeper polished the lens at dusk.",  # the same text twice is paid for once
]


def test_the_estimate_is_the_tokenizers_count_of_the_texts_to_pay_for(db, world, monkeypatch):
    *_, models = world
    openai = models | {"scene_text": OPENAI}
    with db.transaction() as conn:  # one transcript per scene, no other channel
        ids = conn.execute(select(scenes.c.id).order_by(scenes.c.video_id, scenes.c.scene_index)).scalars().all()
        assert len(ids) == len(FIXED_TEXTS)
        for scene_id, transcript in zip(ids, FIXED_TEXTS, strict=True):
            conn.execute(
                update(scenes)
                .where(scenes.c.id == scene_id)
                .values(transcript=transcript, visual_description=None, tags=[], summary=None)
            )
    cl100k = shipped_encoding("cl100k_base")
    expected = sum(len(cl100k.encode_ordinary(t)) for t in set(FIXED_TEXTS))
    p = plan(db, openai, scope="all")
    assert p.estimated_openai_tokens == expected and p.estimate_exact
    assert p.estimated_openai_cost_usd == pytest.approx(expected / 1e6 * 0.02)
    assert expected != sum(-(-len(t.encode()) // 3) for t in set(FIXED_TEXTS))  # not the old bytes rule

    # A text the cache already holds for the model costs nothing.
    korean = FIXED_TEXTS[1]
    with db.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO text_embedding_cache (model_id, text_sha256, embedding, truncated) "
                "VALUES (:m, :s, :e, false)"
            ),
            {"m": OPENAI, "s": hashlib.sha256(korean.encode()).hexdigest(), "e": "[1,0,0]"},
        )
    assert plan(db, openai, scope="all").estimated_openai_tokens == expected - len(cl100k.encode_ordinary(korean))

    # Past the exact budget the rest is extrapolated from bytes at the ratio measured, and the plan says so.
    monkeypatch.setattr(reprocess, "EXACT_TOKEN_BYTES", 1)
    monkeypatch.setattr(reprocess, "TOKEN_COUNT_BATCH", 1)
    p = plan(db, openai, scope="all")
    assert not p.estimate_exact and p.estimated_openai_tokens > 0
