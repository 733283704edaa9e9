"""``owner_discovery_sensor``: one ``owners`` partition per owner; none for deleted ones."""

import dagster as dg
from sqlalchemy import Connection, delete, select

from heimdex_assets.db.tables import embedding_failures, owners, partition_ledger
from heimdex_assets.partitions import owners_partitions
from heimdex_assets.resources import AppDatabase
from heimdex_assets.sensors.discovery import MAX_NEW_PARTITIONS_PER_TICK, discovery_result, ids_of


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
        gone = ids_of(to_delete)
        if gone:
            # Persons, photos, videos and their rows went with the owner (foreign keys); failures and
            # ledger rows (the owner's and its videos') have none.
            conn.execute(delete(embedding_failures).where(embedding_failures.c.owner_id.in_(gone)))
            conn.execute(delete(partition_ledger).where(partition_ledger.c.owner_id.in_(gone)))
    return discovery_result(context, owners_partitions, len(existing), to_add, to_delete)
