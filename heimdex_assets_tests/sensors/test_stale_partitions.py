import json
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select, update

from heimdex_assets.assets import DERIVED_ASSETS, OWNER_ASSETS, SOURCE_ASSETS, VIDEO_ASSETS, scene_clip_embeddings
from heimdex_assets.db.tables import embedding_failures, scenes
from heimdex_assets.freshness import partition_states
from heimdex_assets.launch import RANGE_END_TAG, RANGE_START_TAG
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex
from heimdex_assets.sensors.stale_partitions import plan_launches, stale_partitions_sensor
from heimdex_assets.steps import SCENE_CLIP
from heimdex_assets_tests.conftest import materialize_videos

ALL_VIDEO_ASSETS = {"scene_text_embeddings", "scene_clip_embeddings", "scene_person_embeddings", "scene_search_index"}
BY_KEY = {a.key.to_user_string(): a for a in DERIVED_ASSETS}


@pytest.fixture
def run_resources(resources, tmp_path):
    """What the video assets need to run: the shared resources, a search index and a person detector."""
    return resources | {
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite")),
        "person_detector": OpenCvPersonDetector(),
    }


def tick(instance, run_resources, cursor=None):
    """One evaluation as the daemon makes it: run requests resolved against the assets' job (partition
    keys validated, partition and sensor tags added)."""
    defs = dg.Definitions(
        assets=[*SOURCE_ASSETS, *DERIVED_ASSETS], sensors=[stale_partitions_sensor], resources=run_resources
    )
    sensor_resources = {k: run_resources[k] for k in ("db", "clip", "text_embedder", "person_detector", "search_index")}
    # With the instance's ref, as the daemon gives it: partition keys are checked against the instance.
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        resources=sensor_resources,
        cursor=cursor,
        definitions=defs,
    ) as context:
        return stale_partitions_sensor.evaluate_tick(context)


def selected(request: dg.RunRequest) -> set[str]:
    return {k.to_user_string() for k in request.asset_selection}


def range_keys(request: dg.RunRequest, order: list[str]) -> list[str]:
    """The partitions a request covers, read as Dagster reads them."""
    if request.partition_key is not None:
        assert RANGE_START_TAG not in request.tags
        return [request.partition_key]
    return order[order.index(request.tags[RANGE_START_TAG]) : order.index(request.tags[RANGE_END_TAG]) + 1]


def execute(request: dg.RunRequest, run_resources, instance) -> None:
    """Runs a request the way the daemon would: its assets, its partition key or its range tags."""
    dg.materialize(
        [BY_KEY[k] for k in selected(request)],
        partition_key=request.partition_key,
        tags=request.tags,
        resources=run_resources,
        instance=instance,
    )


@pytest.fixture
def processed(rows, run_resources, instance):
    """An owner with two videos whose every asset is materialised (the owner's too: it has no persons,
    and a partition never written is missing however few items it has)."""
    owner = rows.owner()
    videos = [rows.video(owner, 2) for _ in range(2)]
    materialize_videos(VIDEO_ASSETS, [str(v) for v in videos], run_resources, instance)
    instance.add_dynamic_partitions("owners", [str(owner)])
    dg.materialize(OWNER_ASSETS, partition_key=str(owner), resources=run_resources, instance=instance)
    return owner, videos


def test_everything_fresh_after_materialisation_is_a_skip(processed, run_resources, instance):
    result = tick(instance, run_resources)
    assert not result.run_requests
    assert result.skip_message == "every partition is fresh"


def test_an_edited_transcript_requests_its_video_for_text_and_search_in_one_run(db, processed, run_resources, instance):
    _, videos = processed
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id == videos[1], scenes.c.scene_index == 0)
            .values(transcript="The lighthouse keeper polished the lens at dusk.")
        )
    (request,) = tick(instance, run_resources).run_requests
    assert selected(request) == {"scene_text_embeddings", "scene_search_index"}
    assert request.partition_key == str(videos[1])

    execute(request, run_resources, instance)
    assert tick(instance, run_resources).skip_message == "every partition is fresh"


def test_a_new_ready_video_is_requested_for_every_asset_and_its_run_makes_it_fresh(
    rows, processed, run_resources, instance
):
    owner, _ = processed
    new = str(rows.video(owner, 2))
    instance.add_dynamic_partitions("videos", [new])
    (request,) = tick(instance, run_resources).run_requests
    assert selected(request) == ALL_VIDEO_ASSETS
    assert request.partition_key == new
    assert request.tags["dagster/partition"] == new  # resolved against the assets' job, as the daemon does
    assert request.tags["dagster/sensor_name"] == "stale_partitions_sensor"

    execute(request, run_resources, instance)
    assert tick(instance, run_resources).skip_message == "every partition is fresh"


def test_a_range_request_executes_through_its_tags(rows, run_resources, instance):
    owner = rows.owner()
    keys = [str(rows.video(owner, 1)) for _ in range(3)]
    instance.add_dynamic_partitions("videos", keys)
    instance.add_dynamic_partitions("owners", [str(owner)])  # never written: missing, even without persons
    requests = tick(instance, run_resources).run_requests
    (request,) = [r for r in requests if selected(r) == ALL_VIDEO_ASSETS]
    assert request.partition_key is None
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (keys[0], keys[-1])
    (owner_request,) = [r for r in requests if r is not request]
    assert owner_request.partition_key == str(owner)

    for r in requests:
        execute(r, run_resources, instance)
    assert tick(instance, run_resources).skip_message == "every partition is fresh"


def test_failed_partitions_wait_for_the_backoff(db, rows, processed, run_resources, instance):
    owner, _ = processed
    new = rows.video(owner, 1)
    with db.engine.connect() as conn:
        scene_id, uri = conn.execute(select(scenes.c.id, scenes.c.thumbnail_uri).where(scenes.c.video_id == new)).one()
    Path(uri).write_text("the thumbnail was overwritten")  # its declared sha256 no longer matches
    materialize_videos([scene_clip_embeddings], [str(new)], run_resources, instance)
    with db.engine.connect() as conn:
        (failure,) = conn.execute(select(embedding_failures)).all()
        state = partition_states(conn, SCENE_CLIP, expected_models(conn, run_resources))[str(new)]
    assert (failure.step, failure.item_id, failure.partition_id) == ("scene_clip", str(scene_id), new)
    assert (state.state, state.failed_items) == ("failed", 1)

    (request,) = tick(instance, run_resources).run_requests
    assert selected(request) == ALL_VIDEO_ASSETS - {scene_clip_embeddings.key.to_user_string()}
    assert request.partition_key == str(new)


def test_unregistered_partitions_are_not_requested(rows, processed, run_resources, instance):
    owner, _ = processed
    new = str(rows.video(owner, 1))
    result = tick(instance, run_resources)
    assert not result.run_requests
    assert "not registered yet" in result.skip_message
    instance.add_dynamic_partitions("videos", [new])
    assert [r.partition_key for r in tick(instance, run_resources).run_requests] == [new]


def test_many_missing_videos_come_in_contiguous_ranges_of_50_once_an_hour(rows, run_resources, instance):
    owner = rows.owner()
    made = [str(rows.video(owner, 1)) for _ in range(120)]
    order = made[::-1]  # registration order, not creation order, is the partitions' order
    instance.add_dynamic_partitions("videos", order)

    first = tick(instance, run_resources)
    assert [selected(r) for r in first.run_requests] == [ALL_VIDEO_ASSETS] * 3
    assert [range_keys(r, order) for r in first.run_requests] == [order[:50], order[50:100], order[100:]]

    again = tick(instance, run_resources, cursor=first.cursor)
    assert not again.run_requests
    assert "within the hour" in again.skip_message

    # An hour later with the partitions still missing (runs lost): requested again.
    cursor = json.loads(again.cursor)
    for entry in cursor["launched"]:
        entry["at"] -= 3601
    later = tick(instance, run_resources, cursor=json.dumps(cursor))
    assert [range_keys(r, order) for r in later.run_requests] == [order[:50], order[50:100], order[100:]]


def test_requests_beyond_the_cap_are_left_for_later_ticks(db, rows, run_resources):
    owner = rows.owner()
    order = [str(rows.video(owner, 1)) for _ in range(120)]
    with db.engine.connect() as conn:
        plan = plan_reprocess(conn, ReprocessRequest(scope="all"), expected_models(conn, run_resources))
    ranges, left = plan_launches(plan, {"video": order, "owner": []}, set(), max_requests=2)
    assert [keys for *_, keys in ranges] == [order[:50], order[50:100]]
    assert left == 20
