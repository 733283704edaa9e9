"""``owner_discovery_sensor``: one ``owners`` partition per owner; none for deleted ones."""

import uuid

import dagster as dg
from sqlalchemy import Connection, delete, select

from heimdex_assets.db.tables import embedding_failures, owners
from heimdex_assets.partitions import InvalidIdError, canonical_uuid, owners_partitions
from heimdex_assets.resources import AppDatabase
from heimdex_assets.sensors.video_discovery import MAX_NEW_PARTITIONS_PER_TICK


def plan_owner_partitions(
    conn: Connection, existing: set[str], limit: int = MAX_NEW_PARTITIONS_PER_TICK
) -> tuple[list[str], list[str]]:
    """Keys to add (owners without one, by creation time then id, at most ``limit``)
    and keys to delete (owners that no longer exist)."""
    known = conn.execute(select(owners.c.id).order_by(owners.c.created_at, owners.c.id)).scalars().all()
    to_add = [key for key in map(str, known) if key not in existing][:limit]
    present = {str(o) for o in known}
    to_delete = sorted(k for k in existing if k not in present)
    return to_add, to_delete


def _is_uuid(key: str) -> bool:
    try:
        canonical_uuid(key)
    except InvalidIdError:
        return False
    return True


@dg.sensor(
    name="owner_discovery_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds an owners partition for each owner; removes those of deleted owners.",
)
def owner_discovery_sensor(context: dg.SensorEvaluationContext, db: AppDatabase) -> dg.SensorResult:
    """Registers owners as partitions, oldest first, 25k at most a tick."""
    existing = set(context.instance.get_dynamic_partitions(owners_partitions.name))
    with db.transaction() as conn:
        to_add, to_delete = plan_owner_partitions(conn, existing)
        gone = [uuid.UUID(k) for k in to_delete if _is_uuid(k)]  # a stray non-UUID key owns nothing
        if gone:
            # Persons, photos and their vectors went with the owner (foreign keys); failure records have none.
            conn.execute(delete(embedding_failures).where(embedding_failures.c.owner_id.in_(gone)))
    requests = []
    if to_add:
        requests.append(owners_partitions.build_add_request(to_add))
    if to_delete:
        requests.append(owners_partitions.build_delete_request(to_delete))
    context.log.info(f"owners partitions: +{len(to_add)} -{len(to_delete)} (had {len(existing)})")
    return dg.SensorResult(
        dynamic_partitions_requests=requests,
        skip_reason=None if requests else dg.SkipReason("every owner has its partition"),
    )
