import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from sqlalchemy import select, text

from heimdex_assets.assets import scene_search_index
from heimdex_assets.db.tables import embedding_failures, partition_ledger, videos
from heimdex_assets.resources import SearchIndex
from heimdex_assets.sensors import video_discovery_sensor
from heimdex_assets.sensors.video_discovery import plan_video_partitions
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import materialize_videos, tick_sensor
from heimdex_assets_tests.sensors.test_owner_discovery import record_failure


@pytest.fixture
def search_index(tmp_path):
    return SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite"))


def tick(instance, db, search_index=None):
    resources = {"db": db, "search_index": search_index or SearchIndex(sqlite_path=":memory:")}
    return tick_sensor(video_discovery_sensor, instance, resources)


def test_ready_videos_become_partitions_sorted_by_owner_then_creation(db, rows, instance):
    base = datetime(2026, 1, 1, tzinfo=UTC)
    owner_b, owner_a = sorted([rows.owner("x"), rows.owner("y")], reverse=True)
    late_a = rows.video(owner_a, 0, created_at=base + timedelta(days=2))
    early_a = rows.video(owner_a, 0, created_at=base)
    early_b = rows.video(owner_b, 0, created_at=base - timedelta(days=1))
    rows.video(owner_a, 0, status="PROCESSING")
    rows.video(owner_b, 0, status="UPLOADING")

    result = tick(instance, db)

    (request,) = result.dynamic_partitions_requests
    assert list(request.partition_keys) == [str(early_a), str(late_a), str(early_b)]
    assert instance.get_dynamic_partitions("videos") == [str(early_a), str(late_a), str(early_b)]
    again = tick(instance, db)  # nothing new: no request
    assert not again.dynamic_partitions_requests


def test_at_most_the_cap_is_added_per_tick(db, rows):
    owner = rows.owner()
    made = [str(rows.video(owner, 0)) for _ in range(5)]
    with db.engine.connect() as conn:
        first, _ = plan_video_partitions(conn, set(), limit=2)
        second, _ = plan_video_partitions(conn, set(first), limit=2)
        third, _ = plan_video_partitions(conn, set(first + second), limit=2)
    assert first + second + third == made
    assert len(third) == 1


def test_deleted_videos_lose_their_partition_failure_records_ledger_stamps_and_documents(
    db, rows, instance, search_index
):
    owner = rows.owner()
    keep, gone = rows.video(owner, 1), rows.video(owner, 1)
    tick(instance, db, search_index)
    # Documents of an older search version, and of the current one written by the asset (with its ledger).
    search_index.ensure_index("v1")
    docs = [
        {
            "scene_id": str(uuid.uuid4()),
            "video_id": str(v),
            "owner_id": str(owner),
            "scene_index": 0,
            "start_s": 0.0,
            "end_s": 1.0,
            "transcript": "lighthouse keeper",
            "visual_description": "",
            "tags": [],
            "summary": None,
        }
        for v in (keep, gone)
    ]
    search_index.upsert_documents("v1", docs)
    search_index.activate("v1")
    materialize_videos([scene_search_index], [str(keep), str(gone)], {"db": db, "search_index": search_index}, instance)
    version = SPEC.step("scene_search").version
    assert search_index.active_version() == version
    with db.transaction() as conn:
        for video in (keep, gone):
            record_failure(conn, "scene_clip", partition_id=video, owner_id=owner, video_id=video)
        conn.execute(videos.delete().where(videos.c.id == gone))

    result = tick(instance, db, search_index)

    deletes = [r for r in result.dynamic_partitions_requests if isinstance(r, dg.DeleteDynamicPartitionsRequest)]
    assert [list(r.partition_keys) for r in deletes] == [[str(gone)]]
    assert instance.get_dynamic_partitions("videos") == [str(keep)]
    with db.engine.connect() as conn:
        assert conn.execute(select(embedding_failures.c.partition_id)).scalars().all() == [keep]
        assert conn.execute(select(partition_ledger.c.partition_id)).scalars().all() == [keep]
        stamped = set(conn.execute(text("SELECT DISTINCT partition_id FROM input_stamps")).scalars())
    assert gone not in stamped and keep in stamped
    # Its documents are gone from every version: searches (the current one) and the old index.
    assert [h.video_id for h in search_index.search(str(owner), "harbour")] == [str(keep)]
    assert set(search_index.get_documents("v1", [d["scene_id"] for d in docs])) == {docs[0]["scene_id"]}
    assert search_index.count(version) == 1 and search_index.count("v1") == 1
