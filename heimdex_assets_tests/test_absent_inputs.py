"""Absent input is no item: scenes without a thumbnail give the CLIP and person steps nothing to do, no
failure, and a fresh partition that no reprocess redoes; a declared thumbnail that cannot be read stays a
failure with its reason."""

import uuid

from sqlalchemy import func, insert, select

from heimdex_assets.assets import scene_clip_embeddings, scene_person_embeddings
from heimdex_assets.db.tables import embedding_failures, scenes
from heimdex_assets.freshness import partition_states
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex
from heimdex_assets.steps import SCENE_CLIP, SCENE_PERSON
from heimdex_assets_tests.conftest import materialize_videos

VIDEOS, SCENES_PER_VIDEO = 10, 100


def meta(result, node: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def test_a_thousand_scenes_without_thumbnails_are_no_items_no_failures_and_fresh(
    db, rows, resources, instance, tmp_path
):
    owner = rows.owner()
    videos = sorted(str(rows.video(owner, n_scenes=0)) for _ in range(VIDEOS))
    blank = ["", "   ", None]  # no URI, or one that is only whitespace
    with db.transaction() as conn:
        conn.execute(
            insert(scenes),
            [
                {
                    "id": uuid.uuid4(),
                    "video_id": uuid.UUID(v),
                    "owner_id": owner,
                    "scene_index": i,
                    "start_s": i * 10.0,
                    "end_s": i * 10.0 + 9.0,
                    "transcript": f"Scene {i} of video {v[:8]}.",
                    "thumbnail_uri": blank[i % 3],
                }
                for v in videos
                for i in range(SCENES_PER_VIDEO)
            ],
        )
    run_resources = resources | {
        "person_detector": OpenCvPersonDetector(),
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite")),
    }

    result = materialize_videos([scene_clip_embeddings, scene_person_embeddings], videos, run_resources, instance)

    # One materialisation per partition and asset, each with nothing to compute and nothing failed.
    for node in ("scene_clip_embeddings", "scene_person_embeddings"):
        events = result.asset_materializations_for_node(node)
        assert len(events) == VIDEOS
        for event in events:
            m = {k: v.value for k, v in event.metadata.items()}
            assert (m["items_computed"], m["failures"], m["rows_written"]) == (0, 0, 0), (node, m)
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(embedding_failures)).scalar_one() == 0
        models = expected_models(conn, run_resources)
        for step in (SCENE_CLIP, SCENE_PERSON):
            states = partition_states(conn, step, models)
            assert {k: (s.state, s.items, s.failed_items) for k, s in states.items()} == {
                v: ("fresh", 0, 0) for v in videos
            }
        # So a reprocess of those steps has nothing to redo.
        plan = plan_reprocess(conn, ReprocessRequest(scope="all", steps=("scene_clip",)), models)
    assert plan.assets["scene_clip_embeddings"].partitions == []
    assert plan.assets["scene_person_embeddings"].partitions == []


def test_a_declared_thumbnail_that_cannot_be_read_stays_a_failure(db, rows, resources, instance, tmp_path):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=1)
    missing = tmp_path / "media" / "gone.png"  # inside the allowed roots, never written
    scene = rows.scene(video, owner, 1, thumbnail_uri=str(missing), thumbnail_sha256="a" * 64)
    result = materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    m = meta(result, "scene_clip_embeddings")
    assert (m["items_computed"], m["failures"]) == (2, 1)
    with db.engine.connect() as conn:
        (reason,) = conn.execute(
            select(embedding_failures.c.reason).where(embedding_failures.c.item_id == str(scene))
        ).scalars()
    assert reason == f"file not found: {missing}"
