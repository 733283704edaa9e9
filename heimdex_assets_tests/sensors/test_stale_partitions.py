from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select, update

from heimdex_assets.assets import DERIVED_ASSETS, OWNER_ASSETS, SOURCE_ASSETS, VIDEO_ASSETS, scene_clip_embeddings
from heimdex_assets.db.tables import embedding_failures, scenes
from heimdex_assets.freshness import partition_states
from heimdex_assets.launch import RANGE_END_TAG, RANGE_START_TAG, scenes_per_run
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex
from heimdex_assets.sensors.stale_partitions import (
    LAUNCHED_BY_TAG,
    Launch,
    pack_runs,
    partition_weights,
    plan_launches,
    stale_partitions_sensor,
    submit_backfill,
)
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


def tick(instance, run_resources):
    """One evaluation as the daemon makes it, with the instance's ref as the daemon gives it."""
    defs = dg.Definitions(
        assets=[*SOURCE_ASSETS, *DERIVED_ASSETS], sensors=[stale_partitions_sensor], resources=run_resources
    )
    sensor_resources = {k: run_resources[k] for k in ("db", "clip", "text_embedder", "person_detector", "search_index")}
    with dg.build_sensor_context(
        instance=instance, instance_ref=instance.get_ref(), resources=sensor_resources, definitions=defs
    ) as context:
        return stale_partitions_sensor.evaluate_tick(context)


def backfill_of(request: dg.RunRequest) -> tuple[set[str], list[str]]:
    """The assets and partitions (in the order of ``order``) of a request for an asset backfill."""
    subsets = request.asset_graph_subset.partitions_subsets_by_asset_key
    partitions = {frozenset(s.get_partition_keys()) for s in subsets.values()}
    assert len(partitions) == 1, "every asset of a backfill over the same partitions"
    return {k.to_user_string() for k in subsets}, sorted(partitions.pop())


def in_order(keys, order: list[str]) -> list[str]:
    return sorted(keys, key=order.index)


def execute(request: dg.RunRequest, run_resources, instance, order: list[str]) -> None:
    """Runs a backfill request as its one run would: its assets over its partitions' range."""
    assets, keys = backfill_of(request)
    keys = in_order(keys, order)
    tags = {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]} if len(keys) > 1 else {}
    dg.materialize(
        [BY_KEY[k] for k in assets],
        partition_key=keys[0] if len(keys) == 1 else None,
        tags=request.tags | tags,
        resources=run_resources,
        instance=instance,
    )


def submit_as_daemon(instance, request: dg.RunRequest) -> None:
    """What the sensor daemon does with a backfill request: adds the backfill (status REQUESTED)."""
    from dagster._core.execution.backfill import PartitionBackfill

    instance.add_backfill(
        PartitionBackfill.from_asset_graph_subset(
            backfill_id=f"b{len(instance.get_backfills())}",
            dynamic_partitions_store=instance,
            backfill_timestamp=0.0,
            asset_graph_subset=request.asset_graph_subset,
            tags=request.tags,
            title=None,
            description=None,
            run_config=None,
        )
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


def test_an_edited_transcript_backfills_its_video_for_text_and_search_once(db, processed, run_resources, instance):
    _, videos = processed
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id == videos[1], scenes.c.scene_index == 0)
            .values(transcript="The lighthouse keeper polished the lens at dusk.")
        )
    (request,) = tick(instance, run_resources).run_requests
    assert request.requires_backfill_daemon()
    assert backfill_of(request) == ({"scene_text_embeddings", "scene_search_index"}, [str(videos[1])])
    assert request.tags[LAUNCHED_BY_TAG] == "stale_partitions_sensor"

    # While its backfill is queued or running, the next tick requests nothing.
    submit_as_daemon(instance, request)
    again = tick(instance, run_resources)
    assert not again.run_requests
    assert "queued or running backfill" in again.skip_message

    execute(request, run_resources, instance, [str(v) for v in videos])
    assert tick(instance, run_resources).skip_message == "every partition is fresh"


def test_a_new_ready_video_is_backfilled_for_every_asset_and_its_run_makes_it_fresh(
    rows, processed, run_resources, instance
):
    owner, _ = processed
    new = str(rows.video(owner, 2))
    instance.add_dynamic_partitions("videos", [new])
    (request,) = tick(instance, run_resources).run_requests
    assert backfill_of(request) == (ALL_VIDEO_ASSETS, [new])

    execute(request, run_resources, instance, [new])
    assert tick(instance, run_resources).skip_message == "every partition is fresh"


def test_a_range_backfill_executes_and_owners_get_their_own(rows, run_resources, instance):
    owner = rows.owner()
    keys = [str(rows.video(owner, 1)) for _ in range(3)]
    instance.add_dynamic_partitions("videos", keys)
    instance.add_dynamic_partitions("owners", [str(owner)])  # never written: missing, even without persons
    requests = tick(instance, run_resources).run_requests
    (videos_request,) = [r for r in requests if backfill_of(r)[0] == ALL_VIDEO_ASSETS]
    assert backfill_of(videos_request)[1] == sorted(keys)
    (owner_request,) = [r for r in requests if r is not videos_request]
    assert backfill_of(owner_request) == ({"person_photo_embeddings", "person_query_embeddings"}, [str(owner)])

    execute(videos_request, run_resources, instance, keys)
    execute(owner_request, run_resources, instance, [str(owner)])
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
    assert backfill_of(request) == (ALL_VIDEO_ASSETS - {scene_clip_embeddings.key.to_user_string()}, [str(new)])


def test_unregistered_partitions_are_not_requested(rows, processed, run_resources, instance):
    owner, _ = processed
    new = str(rows.video(owner, 1))
    result = tick(instance, run_resources)
    assert not result.run_requests
    assert "not registered yet" in result.skip_message
    instance.add_dynamic_partitions("videos", [new])
    assert [backfill_of(r)[1] for r in tick(instance, run_resources).run_requests] == [[new]]


@pytest.fixture
def fifty_scenes_per_run(monkeypatch):
    """HEIMDEX_SCENES_PER_RUN=50 for one test (the setting is read once per process, hence the cache)."""
    monkeypatch.setenv("HEIMDEX_SCENES_PER_RUN", "50")
    scenes_per_run.cache_clear()
    yield
    monkeypatch.delenv("HEIMDEX_SCENES_PER_RUN")
    scenes_per_run.cache_clear()


def test_many_missing_videos_come_in_backfills_of_one_run_each_never_twice(
    rows, run_resources, instance, fifty_scenes_per_run
):
    owner = rows.owner()
    made = [str(rows.video(owner, 1)) for _ in range(120)]
    order = made[::-1]  # registration order, not creation order, is the partitions' order
    instance.add_dynamic_partitions("videos", order)
    first = tick(instance, run_resources).run_requests
    # 1 scene each, 50 scenes a run: runs of 50 videos.
    assert [backfill_of(r)[0] for r in first] == [ALL_VIDEO_ASSETS] * 3
    assert [in_order(backfill_of(r)[1], order) for r in first] == [order[:50], order[50:100], order[100:]]

    submit_as_daemon(instance, first[0])
    second = tick(instance, run_resources).run_requests
    assert [in_order(backfill_of(r)[1], order) for r in second] == [order[50:100], order[100:]]


@pytest.fixture
def missing_videos(db, rows, run_resources, instance):
    """60 registered videos of 3 scenes, never processed, and the plan of all of them."""
    owner = rows.owner()
    order = [str(rows.video(owner, 3)) for _ in range(60)]
    instance.add_dynamic_partitions("videos", order)
    with db.engine.connect() as conn:
        plan = plan_reprocess(conn, ReprocessRequest(scope="all"), expected_models(conn, run_resources))
        weights = {kind: partition_weights(conn, kind) for kind in ("video", "owner")}
    plan.assets = {k: a for k, a in plan.assets.items() if k in ALL_VIDEO_ASSETS}
    return order, plan, weights


def test_runs_are_sized_by_scenes(missing_videos):
    order, plan, weights = missing_videos
    assert {weights["video"][k] for k in order} == {3}
    launches, left = plan_launches(plan, {"video": order, "owner": []}, set(), weights, per_run=30)
    assert [len(lc.partitions) for lc in launches] == [10] * 6 and left == 0
    assert [lc.scenes for lc in launches] == [30] * 6
    assert [lc.partitions for lc in launches] == [order[i : i + 10] for i in range(0, 60, 10)]


def test_scattered_stale_videos_pack_with_the_fresh_ones_between(missing_videos):
    order, plan, weights = missing_videos
    scattered = order[::6]  # 10 stale videos, 5 fresh between each two
    for asset in plan.assets.values():
        asset.partitions = list(scattered)
    launches, _ = plan_launches(plan, {"video": order, "owner": []}, set(), weights, per_run=1000)
    # One run: the 10 stale videos and the fresh ones between them (a run starts and ends on a stale one).
    assert [(len(lc.partitions), lc.stale) for lc in launches] == [(55, 10)]
    assert {k for lc in launches for k in lc.partitions if k in set(scattered)} == set(scattered)
    assert launches[0].partitions == order[:55]


def test_launches_skip_what_a_backfill_submitted_by_the_job_covers(missing_videos, instance):
    order, plan, weights = missing_videos
    launch = Launch("video", sorted(ALL_VIDEO_ASSETS), order[:20], 20, 60)
    submit_backfill(instance, launch, {LAUNCHED_BY_TAG: "test"}, "test")
    from heimdex_assets.sensors.stale_partitions import in_flight_partitions

    in_flight = in_flight_partitions(instance, {"video": order, "owner": []})
    assert in_flight == {(a, k) for a in ALL_VIDEO_ASSETS for k in order[:20]}
    launches, _ = plan_launches(plan, {"video": order, "owner": []}, in_flight, weights, per_run=1000)
    assert [lc.partitions for lc in launches] == [order[20:60]]


@pytest.mark.parametrize(
    ("stale_every", "per_run", "cap", "expected_runs"),
    [
        (1, 1000, None, 20),  # 1,000 contiguous videos of 20 scenes: 50 a run
        (10, 1000, None, 20),  # every 10th of 10,000: the same 20 runs, fresh videos carried between
        (10, 20_000, None, 1),  # a GPU's run holds them all
        (10, 1000, 50, 200),  # under a 50-partition cap, scattered videos cannot pack: 5 a run
        (200, 1000, None, 1000),  # stale videos farther apart than MAX_BRIDGED_FRESH: one run each
    ],
)
def test_pack_runs_counts(stale_every, per_run, cap, expected_runs):
    order = [f"v{i:05d}" for i in range(1000 * stale_every)]
    stale = set(order[::stale_every])
    runs = pack_runs(order, stale, dict.fromkeys(order, 20), per_run, cap)
    assert len(runs) == expected_runs
    assert sorted(k for run in runs for k in run if k in stale) == sorted(stale)
    for run in runs:
        assert run[0] in stale and run[-1] in stale
        assert run == order[order.index(run[0]) : order.index(run[-1]) + 1]  # contiguous: one Dagster range


@pytest.mark.parametrize("stale_every", [1, 10])
def test_pack_runs_of_uneven_videos_are_full_but_the_last(stale_every):
    """Videos of 5-35 scenes: each run takes stale videos until it holds the scenes asked for, so the run
    count is the work over the run size, rounded up (at most 20 runs for 1,000 videos of 20 scenes on average)."""
    order = [f"v{i:05d}" for i in range(1000 * stale_every)]
    weights = {k: 5 + (i * 7919) % 31 for i, k in enumerate(order)}
    stale = set(order[::stale_every])
    work = sum(weights[k] for k in stale)
    runs = pack_runs(order, stale, weights, 1000)
    assert len(runs) == -(-work // 1000) <= 20
    held = [sum(weights[k] for k in run if k in stale) for run in runs]
    assert all(1000 <= h < 1000 + 35 for h in held[:-1]) and sum(held) == work


def test_pack_runs_never_carries_a_partition_another_run_writes():
    order = [f"v{i}" for i in range(6)]
    runs = pack_runs(order, {"v0", "v2", "v4"}, {}, 100, blocked={"v3"})
    assert runs == [["v0", "v1", "v2"], ["v4"]]
