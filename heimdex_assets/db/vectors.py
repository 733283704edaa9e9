"""Per-partition writes of vector rows: replace a video's rows at one step version, atomically."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, Table, delete, not_, or_, tuple_
from sqlalchemy.dialects.postgresql import insert


def upsert_vectors(conn: Connection, table: Table, rows: list[dict[str, Any]], key: list[str]) -> None:
    """Insert rows, or update those whose model, input or vector changed; equal rows stay untouched."""
    if not rows:
        return
    stmt = insert(table)
    changed = or_(
        *(table.c[col].is_distinct_from(stmt.excluded[col]) for col in ("model_id", "input_sha256", "embedding"))
    )
    updates = {col: stmt.excluded[col] for col in rows[0] if col not in key}
    updates["created_at"] = stmt.excluded.created_at
    conn.execute(stmt.on_conflict_do_update(index_elements=key, set_=updates, where=changed), rows)


def replace_video_rows(
    conn: Connection,
    table: Table,
    video_id: uuid.UUID,
    version: str,
    rows: list[dict[str, Any]],
    key: list[str],
) -> None:
    """Make ``rows`` the video's rows at ``version``: rows of items not among them are deleted.

    Run inside the partition's transaction, so a crash leaves the old rows or the new, never a mix.
    """
    item_cols = [c for c in key if c != "step_version"]
    stale = delete(table).where(table.c.video_id == video_id, table.c.step_version == version)
    if rows:
        keep = [tuple(r[c] for c in item_cols) for r in rows]
        stale = stale.where(not_(tuple_(*(table.c[c] for c in item_cols)).in_(keep)))
    conn.execute(stale)
    upsert_vectors(conn, table, rows, key)
