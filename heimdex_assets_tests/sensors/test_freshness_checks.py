import dagster as dg
import pytest
from sqlalchemy import update

from heimdex_assets.assets import VIDEO_ASSETS
from heimdex_assets.checks import check_key, freshness_key
from heimdex_assets.db.tables import scenes
from heimdex_assets.freshness import PartitionState
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex
from heimdex_assets.sensors.freshness_checks import (
    BUCKETS,
    changed_evaluations,
    freshness_checks_sensor,
    read_cursor,
    record_freshness_checks_job,
    write_cursor,
)
from heimdex_assets_tests.conftest import materialize_videos

VIDEO_ASSET_KEYS = ("scene_text_embeddings", "scene_clip_embeddings", "scene_person_embeddings", "scene_search_index")


@pytest.fixture
def run_resources(resources, tmp_path):
    return resources | {
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite")),
        "person_detector": OpenCvPersonDetector(),
    }


def tick(instance, run_resources, cursor=None) -> dg.SensorResult:
    """One evaluation, its run executed as the daemon would; returns the result and the events it recorded."""
    sensor_resources = {k: run_resources[k] for k in ("db", "clip", "text_embedder", "person_detector", "search_index")}
    with dg.build_sensor_context(instance=instance, resources=sensor_resources, cursor=cursor) as context:
        result = freshness_checks_sensor(context)
    events = []
    for request in result.run_requests or []:
        run = record_freshness_checks_job.execute_in_process(run_config=request.run_config, instance=instance)
        events += [e.event_specific_data for e in run.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return result, events


def recorded_states(instance, asset_key: str) -> dict[str, tuple[bool, str]]:
    """Per partition, the latest recorded result of the asset's freshness check: (passed, state)."""
    records = instance.get_event_records(
        dg.EventRecordsFilter(dg.DagsterEventType.ASSET_CHECK_EVALUATION), ascending=True
    )
    latest = {}
    for record in records:
        e = record.event_log_entry.dagster_event.event_specific_data
        if e.asset_check_key == check_key(asset_key):
            latest[e.partition] = (e.passed, e.metadata["state"].value)
    return latest


def test_the_check_records_fresh_stale_and_missing_partitions_and_then_only_changes(db, rows, run_resources, instance):
    owner = rows.owner()
    fresh, edited, missing = (str(rows.video(owner, 2)) for _ in range(3))
    materialize_videos(VIDEO_ASSETS, [fresh, edited], run_resources, instance)
    instance.add_dynamic_partitions("videos", [missing])
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id == edited, scenes.c.scene_index == 0)
            .values(transcript="The lighthouse keeper polished the lens at dusk.")
        )

    first, first_events = tick(instance, run_resources)

    # The transcript feeds the text vectors and the search document, not the CLIP or person vectors.
    for asset_key in VIDEO_ASSET_KEYS:
        edited_state = "stale" if asset_key in ("scene_text_embeddings", "scene_search_index") else "fresh"
        assert recorded_states(instance, asset_key) == {
            fresh: (True, "fresh"),
            edited: (edited_state == "fresh", edited_state),
            missing: (False, "missing"),
        }, asset_key
    # The owner partition was never registered: nothing recorded for it.
    assert recorded_states(instance, "person_photo_embeddings") == {}
    assert len(first.run_requests) == 1
    assert len(first_events) == 3 * len(VIDEO_ASSET_KEYS)
    latest = instance.get_latest_asset_check_evaluation_record(check_key("scene_text_embeddings"))
    assert latest.partition in {fresh, edited, missing}

    second, second_events = tick(instance, run_resources, cursor=first.cursor)
    assert second_events == []
    assert not second.run_requests
    assert second.skip_reason.skip_message == "no partition changed state"

    # The stale partition redone: only its bucket's results are recorded again, and it reads fresh.
    materialize_videos(VIDEO_ASSETS, [edited], run_resources, instance)
    _, third = tick(instance, run_resources, cursor=second.cursor)
    assert {e.partition for e in third} == {edited}
    assert {e.asset_key for e in third} == {
        freshness_key("scene_text_embeddings"),
        freshness_key("scene_search_index"),
    }
    assert recorded_states(instance, "scene_text_embeddings")[edited] == (True, "fresh")
    assert recorded_states(instance, "scene_search_index")[missing] == (False, "missing")


def state(key: str, s: str) -> PartitionState:
    return PartitionState(key, s, 1, int(s == "stale"), int(s == "failed"))


def test_results_are_capped_per_tick_and_the_rest_follow_on_later_ticks():
    keys = [f"00000000-0000-4000-8000-{i:012d}" for i in range(3000)]
    states = {"scene_clip_embeddings": {k: state(k, "stale") for k in keys}}
    seen, cursor, ticks = [], None, 0
    while True:
        events, recorded, left = changed_evaluations(states, read_cursor(cursor), max_evaluations=1000)
        cursor = write_cursor(recorded)
        if not events:
            break
        ticks += 1
        assert len(events) <= 1000
        seen += [e.partition for e in events]
    assert sorted(seen) == keys  # each partition exactly once
    assert ticks >= 3
    assert left == 0
    assert len(cursor) < 16 * BUCKETS  # bounded by the buckets, not the partitions

    # One partition changes: only its bucket (about 3 partitions here) is recorded again.
    states["scene_clip_embeddings"][keys[7]] = state(keys[7], "fresh")
    events, _, _ = changed_evaluations(states, read_cursor(cursor))
    assert keys[7] in {e.partition for e in events}
    assert len(events) < 20
    assert [e.passed for e in events if e.partition == keys[7]] == [True]
