"""``video_discovery_sensor``: one ``videos`` partition per READY video; none for deleted ones."""

import dagster as dg
from sqlalchemy import Connection, delete, select, text

from heimdex_assets.db.tables import embedding_failures, partition_ledger, videos
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets.sensors.discovery import MAX_NEW_PARTITIONS_PER_TICK, discovery_result, ids_of


def plan_video_partitions(
    conn: Connection, existing: set[str], limit: int = MAX_NEW_PARTITIONS_PER_TICK
) -> tuple[list[str], list[str]]:
    """Keys to add (READY videos without one, by owner then creation time, at most ``limit``)
    and keys to delete (videos that no longer exist)."""
    ready = conn.execute(
        select(videos.c.id)
        .where(videos.c.status == "READY")
        .order_by(videos.c.owner_id, videos.c.created_at, videos.c.id)
    ).scalars()
    to_add = []
    for video_id in ready:
        key = str(video_id)
        if key not in existing:
            to_add.append(key)
            if len(to_add) >= limit:
                break
    known = {str(v) for v in conn.execute(select(videos.c.id)).scalars()}
    to_delete = sorted(k for k in existing if k not in known)
    return to_add, to_delete


@dg.sensor(
    name="video_discovery_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a videos partition for each READY video; removes those of deleted videos, and their documents.",
)
def video_discovery_sensor(
    context: dg.SensorEvaluationContext, db: AppDatabase, search_index: SearchIndex
) -> dg.SensorResult:
    """Registers READY videos as partitions, in (owner, created_at) order, 25k at most a tick."""
    existing = set(context.instance.get_dynamic_partitions(videos_partitions.name))
    with db.transaction() as conn:
        to_add, to_delete = plan_video_partitions(conn, existing)
        if to_delete:
            # Vectors and video failures went with their video (foreign keys, migration 0008); the ledger, stamps
            # and failures recorded without a video id have none.
            gone = ids_of(to_delete)
            conn.execute(delete(embedding_failures).where(embedding_failures.c.partition_id.in_(gone)))
            conn.execute(delete(partition_ledger).where(partition_ledger.c.partition_id.in_(gone)))
            conn.execute(text("DELETE FROM input_stamps WHERE partition_id = ANY(:ids)"), {"ids": gone})
    if to_delete:
        # Their documents, in every index version: deleted videos must not be found any more.
        search_index.delete_videos(None, to_delete)
    return discovery_result(context, videos_partitions, len(existing), to_add, to_delete)
