"""Per-partition writes of vector rows: replace a video's rows at one step version, atomically."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, Table, delete, not_, or_, tuple_
from sqlalchemy.dialects.postgresql import insert

# When a row was (re)written; left alone when nothing else changed.
STAMP_COLUMNS = ("created_at", "indexed_at")


def upsert_vectors(conn: Connection, table: Table, rows: list[dict[str, Any]], key: list[str]) -> None:
    """Insert rows, or update those where any written column changed; equal rows stay untouched."""
    if not rows:
        return
    stmt = insert(table)
    # Every written column but the key is compared, so tables without vectors (scans, ledgers) fit too.
    stamps = [col for col in STAMP_COLUMNS if col in table.c]
    compared = [col for col in rows[0] if col not in key and col not in stamps]
    changed = or_(*(table.c[col].is_distinct_from(stmt.excluded[col]) for col in compared))
    updates = {col: stmt.excluded[col] for col in rows[0] if col not in key}
    updates |= {col: stmt.excluded[col] for col in stamps}  # the column default: now()
    conn.execute(stmt.on_conflict_do_update(index_elements=key, set_=updates, where=changed), rows)


def replace_partition_rows(
    conn: Connection,
    table: Table,
    scope_column: str,
    scope_id: uuid.UUID,
    version: str,
    rows: list[dict[str, Any]],
    key: list[str],
) -> None:
    """Make ``rows`` the partition's rows at ``version`` (the partition: rows whose ``scope_column``
    is ``scope_id``); rows of items not among them are deleted, other partitions and versions untouched.

    Run inside the partition's transaction, so a crash leaves the old rows or the new, never a mix.
    """
    item_cols = [c for c in key if c != "step_version"]
    stale = delete(table).where(table.c[scope_column] == scope_id, table.c.step_version == version)
    if rows:
        keep = [tuple(r[c] for c in item_cols) for r in rows]
        stale = stale.where(not_(tuple_(*(table.c[c] for c in item_cols)).in_(keep)))
    conn.execute(stale)
    upsert_vectors(conn, table, rows, key)


def replace_video_rows(
    conn: Connection, table: Table, video_id: uuid.UUID, version: str, rows: list[dict[str, Any]], key: list[str]
) -> None:
    """``replace_partition_rows`` for a ``videos`` partition."""
    replace_partition_rows(conn, table, "video_id", video_id, version, rows, key)


def replace_owner_rows(
    conn: Connection, table: Table, owner_id: uuid.UUID, version: str, rows: list[dict[str, Any]], key: list[str]
) -> None:
    """``replace_partition_rows`` for an ``owners`` partition."""
    replace_partition_rows(conn, table, "owner_id", owner_id, version, rows, key)
