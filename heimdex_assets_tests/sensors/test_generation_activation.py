"""The activation sensor flips a complete candidate that no run flipped, and reports it on the step's asset."""

import dagster as dg
from sqlalchemy import text

from heimdex_assets.assets import scene_text_embeddings
from heimdex_assets.generations import active_generations
from heimdex_assets.models import record_models
from heimdex_assets.resources import BlobStore, OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID
from heimdex_assets.sensors import generation_activation_sensor
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.fake_openai import FakeOpenAI
from heimdex_assets_tests.test_generations import OPENAI_MODEL, varied_videos


def tick(instance, resources):
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        return generation_activation_sensor(context)


def test_a_refused_candidate_waits_then_flips_when_the_operator_widens_the_margin(
    db, rows, resources, instance, tmp_path, monkeypatch
):
    owner = rows.owner()
    videos = varied_videos(rows, owner, 3, 4)
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    server = FakeOpenAI(random_vectors=True).start()
    try:
        worse = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=server.url)
        with db.transaction() as conn:
            record_models(conn, {"scene_text": OPENAI_MODEL}, "test")
        sensor_resources = {
            "db": db,
            "text_embedder": worse,
            "clip": resources["clip"],
            "blobs": BlobStore(allowed_roots=[str(rows.media)]),
            "person_detector": OpenCvPersonDetector(),
            "search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite")),
        }
        materialize_videos([scene_text_embeddings], videos, resources | {"text_embedder": worse}, instance)

        result = tick(instance, sensor_resources)  # refused by the run already, nothing changed: quiet
        assert result.asset_events == [] and "no candidate generation" in result.skip_reason.skip_message
        with db.engine.connect() as conn:
            assert active_generations(conn)["scene_text"].model_id == LOCAL_MODEL_ID

        monkeypatch.setenv("HEIMDEX_GATE_MARGIN", "1.0")  # the operator accepts any drop
        result = tick(instance, sensor_resources)
        [event] = result.asset_events
        assert event.asset_key == dg.AssetKey("scene_text_embeddings")
        assert event.metadata["activated"].value is True
        figures = event.metadata["evaluation"].data
        assert figures["margin"] == 1.0 and figures["passed"] is True and figures["queries"] == 12
        assert figures["candidate_mrr"] < figures["active_mrr"]
        assert f"scene_text: 2026-01-06 / {OPENAI_MODEL} active (was 2026-01-06 / {LOCAL_MODEL_ID})" in (
            result.skip_reason.skip_message
        )
        with db.engine.connect() as conn:
            assert active_generations(conn)["scene_text"].model_id == OPENAI_MODEL
            actor = conn.execute(
                text("SELECT actor FROM generation_events WHERE action = 'activate' ORDER BY id DESC LIMIT 1")
            ).scalar()
        assert actor == "generation_activation_sensor"
        assert tick(instance, sensor_resources).asset_events == []  # idempotent: nothing more to do
    finally:
        server.stop()
