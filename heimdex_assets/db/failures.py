"""Items that could not be embedded, recorded with their reason so they are not retried blindly."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, and_, case, delete, func
from sqlalchemy.dialects.postgresql import insert

from heimdex_assets.db.tables import embedding_failures


@dataclass(frozen=True)
class FailedItem:
    """One item of a partition that failed: what, under which input, and why."""

    item_id: str
    owner_id: uuid.UUID
    video_id: uuid.UUID | None
    input_sha256: str
    reason: str


def record_failures(conn: Connection, step: str, version: str, model_id: str, items: Iterable[FailedItem]) -> None:
    """Upsert failures; a repeat failure of the same input counts one more attempt."""
    rows = [
        {
            "step": step,
            "item_id": f.item_id,
            "step_version": version,
            "video_id": f.video_id,
            "owner_id": f.owner_id,
            "model_id": model_id,
            "input_sha256": f.input_sha256,
            "reason": f.reason,
        }
        for f in items
    ]
    if not rows:
        return
    stmt = insert(embedding_failures)
    same_input = and_(
        embedding_failures.c.input_sha256 == stmt.excluded.input_sha256,
        embedding_failures.c.model_id == stmt.excluded.model_id,
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["step", "item_id", "step_version"],
            set_={
                "model_id": stmt.excluded.model_id,
                "input_sha256": stmt.excluded.input_sha256,
                "reason": stmt.excluded.reason,
                "failed_at": func.now(),
                # Inside ON CONFLICT the table's columns are the existing row: same input, one more try.
                "attempts": case((same_input, embedding_failures.c.attempts + 1), else_=1),
            },
        ),
        rows,
    )


def clear_failures(conn: Connection, step: str, version: str, item_ids: Iterable[str]) -> None:
    """Forget failures of items that have now succeeded (or no longer exist)."""
    ids = list(item_ids)
    if ids:
        conn.execute(
            delete(embedding_failures).where(
                embedding_failures.c.step == step,
                embedding_failures.c.step_version == version,
                embedding_failures.c.item_id.in_(ids),
            )
        )


def replace_video_failures(
    conn: Connection, step: str, version: str, model_id: str, video_id: uuid.UUID, failed: list[FailedItem]
) -> None:
    """Make ``failed`` the video's failures at ``version``: recorded (attempts counted), every other
    failure of the video at that version forgotten (those items succeeded or no longer exist)."""
    record_failures(conn, step, version, model_id, failed)
    where = [
        embedding_failures.c.step == step,
        embedding_failures.c.step_version == version,
        embedding_failures.c.video_id == video_id,
    ]
    if failed:
        where.append(embedding_failures.c.item_id.not_in([f.item_id for f in failed]))
    conn.execute(delete(embedding_failures).where(*where))
