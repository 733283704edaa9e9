import uuid

from sqlalchemy import select

from heimdex_assets.db.failures import FailedItem, clear_failures, record_failures
from heimdex_assets.db.tables import embedding_failures


def attempts(db):
    with db.engine.connect() as conn:
        rows = conn.execute(select(embedding_failures.c.item_id, embedding_failures.c.attempts))
        return dict(rows.all())


def test_repeat_failures_count_attempts_per_item_and_reset_when_the_input_changes(db):
    owner, video = uuid.uuid4(), uuid.uuid4()
    items = [FailedItem(f"item-{i}", owner, video, f"sha-{i}", "broken") for i in range(3)]
    for _ in range(2):
        with db.transaction() as conn:
            record_failures(conn, "scene_clip", "v1", "m", items)
    assert attempts(db) == {"item-0": 2, "item-1": 2, "item-2": 2}
    with db.transaction() as conn:
        record_failures(conn, "scene_clip", "v1", "m", [FailedItem("item-0", owner, video, "new-sha", "still broken")])
        clear_failures(conn, "scene_clip", "v1", ["item-2"])
    assert attempts(db) == {"item-0": 1, "item-1": 2}
