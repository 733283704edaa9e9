import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
from sqlalchemy import insert, select

from heimdex_assets.assets import person_photo_embeddings
from heimdex_assets.db.tables import embedding_failures, owners, partition_ledger
from heimdex_assets.sensors.owner_discovery import owner_discovery_sensor, plan_owner_partitions
from heimdex_assets_tests.conftest import tick_sensor


def tick(instance, db):
    return tick_sensor(owner_discovery_sensor, instance, {"db": db})


def add_owner(db, created_at, owner_id=None):
    owner_id = owner_id or uuid.uuid4()
    with db.transaction() as conn:
        conn.execute(insert(owners).values(id=owner_id, name=f"owner {owner_id}", created_at=created_at))
    return owner_id


def record_failure(conn, step, partition_id, owner_id, video_id=None, reason="bad"):
    """A failure on record, as a run leaves it: its first attempt, waiting an hour for the next."""
    now = datetime.now(UTC)
    conn.execute(
        insert(embedding_failures).values(
            step=step,
            item_id=str(uuid.uuid4()),
            step_version="v",
            model_id="m",
            partition_id=partition_id,
            video_id=video_id,
            owner_id=owner_id,
            input_sha256="h",
            reason=reason,
            attempts=1,
            failed_at=now,
            retry_at=now + timedelta(hours=1),
        )
    )


def test_owners_become_partitions_oldest_first(db, instance):
    base = datetime(2026, 1, 1, tzinfo=UTC)
    late = add_owner(db, base + timedelta(days=3))
    early = add_owner(db, base)
    # Same creation time: the id decides, so the order is total.
    tie_a, tie_b = sorted([uuid.uuid4(), uuid.uuid4()])
    add_owner(db, base + timedelta(days=1), tie_b)
    add_owner(db, base + timedelta(days=1), tie_a)

    result = tick(instance, db)

    expected = [str(early), str(tie_a), str(tie_b), str(late)]
    (request,) = result.dynamic_partitions_requests
    assert isinstance(request, dg.AddDynamicPartitionsRequest) and request.partitions_def_name == "owners"
    assert list(request.partition_keys) == expected
    assert instance.get_dynamic_partitions("owners") == expected
    assert not tick(instance, db).dynamic_partitions_requests  # nothing new: no request

    newcomer = add_owner(db, base - timedelta(days=9))  # created "earlier", discovered later: appended
    (request,) = tick(instance, db).dynamic_partitions_requests
    assert list(request.partition_keys) == [str(newcomer)]
    assert instance.get_dynamic_partitions("owners") == [*expected, str(newcomer)]


def test_at_most_the_cap_is_added_per_tick(db):
    base = datetime(2026, 1, 1, tzinfo=UTC)
    made = [str(add_owner(db, base + timedelta(hours=i))) for i in range(5)]
    with db.engine.connect() as conn:
        first, _ = plan_owner_partitions(conn, set(), limit=2)
        second, _ = plan_owner_partitions(conn, set(first), limit=2)
        third, _ = plan_owner_partitions(conn, set(first + second), limit=2)
    assert (len(first), len(second), len(third)) == (2, 2, 1)
    assert first + second + third == made


def test_deleted_owners_lose_their_partition_failure_records_and_ledger(db, instance, resources, person_detector):
    base = datetime(2026, 1, 1, tzinfo=UTC)
    keep, gone = add_owner(db, base), add_owner(db, base + timedelta(days=1))
    tick(instance, db)
    # Each owner's partition was run once (a ledger row each), and each has a failure on record.
    for owner in (keep, gone):
        dg.materialize(
            [person_photo_embeddings],
            partition_key=str(owner),
            resources=resources | {"person_detector": person_detector},
            instance=instance,
        )
    with db.transaction() as conn:
        for owner in (keep, gone):
            record_failure(conn, "person_photo", partition_id=owner, owner_id=owner, reason="no person found")
    with db.engine.connect() as conn:
        assert sorted(conn.execute(select(partition_ledger.c.owner_id)).scalars()) == sorted([keep, gone])
    with db.transaction() as conn:
        conn.execute(owners.delete().where(owners.c.id == gone))

    result = tick(instance, db)

    assert [(type(r), list(r.partition_keys)) for r in result.dynamic_partitions_requests] == [
        (dg.DeleteDynamicPartitionsRequest, [str(gone)])
    ]
    assert instance.get_dynamic_partitions("owners") == [str(keep)]
    with db.engine.connect() as conn:
        assert conn.execute(select(embedding_failures.c.owner_id)).scalars().all() == [keep]
        assert conn.execute(select(partition_ledger.c.partition_id)).scalars().all() == [keep]
