"""Which partitions must be redone: derived from the steps' definitions, counted both ways.

A partition (a READY video, or an owner) is, for a step and the model identity expected of it:
- ``missing`` when nothing was ever written for it (for the search step: in the current index),
  even when it has no items: a run records it once;
- ``stale`` when an item has no row of the current generation (step version, model) with its
  current input identity, when a row of that generation has no item any more (deleted scene,
  cleared channel, person without READY photos), when a failure's backoff has passed, or when
  only another generation was ever written for it;
- ``failed`` when its only undone items failed on their current input and wait for their backoff;
- ``fresh`` otherwise.

In bulk this is answered from the partition ledger (what each run read and wrote) and the input
stamps the database keeps (which transaction last changed a partition's inputs): a partition is
compared item by item only when its inputs changed after its run read them, or it has no ledger
at the current generation. So a status over 100k videos reads O(videos) rows, not every scene.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Connection, text

from heimdex_assets.steps import Step

STATES = ("fresh", "stale", "missing", "failed")
# A failed item waits BASE · 2^(attempts-1), at most CAP, before it is tried again on its own.
FAILURE_BACKOFF_BASE = timedelta(hours=1)
FAILURE_BACKOFF_CAP = timedelta(days=7)
ITEM_LEVEL_BATCH = 5000  # partitions compared item by item per query


class PartitionState(NamedTuple):
    """One partition's state for one step, with its item counts and the model bill's input size."""

    key: str
    state: str
    items: int
    stale_items: int
    failed_items: int
    input_bytes: int = 0  # UTF-8 size of the inputs to (re)embed, for cost estimates
    retry_at: datetime | None = None


@dataclass(frozen=True)
class ItemCounts:
    """A partition compared item by item with its rows."""

    items: int = 0
    stale: int = 0
    failed: int = 0
    stray_rows: int = 0
    input_bytes: int = 0
    retry_at: datetime | None = None
    has_rows: bool = False


def _universe_sql(step: Step, owner: bool, ids: bool) -> str:
    if step.partitioning == "video":
        sql = "SELECT v.id, v.owner_id FROM videos v WHERE v.status = 'READY'"
        return sql + (" AND v.owner_id = :owner" if owner else "") + (" AND v.id = ANY(:ids)" if ids else "")
    sql = "SELECT o.id, o.id AS owner_id FROM owners o WHERE TRUE"
    return sql + (" AND o.id = :owner" if owner else "") + (" AND o.id = ANY(:ids)" if ids else "")


def item_counts(
    conn: Connection, step: Step, models: dict[str, str], partition_ids: list[uuid.UUID]
) -> dict[uuid.UUID, ItemCounts]:
    """Compare every item of these partitions with the rows and failures of the current generation."""
    out: dict[uuid.UUID, ItemCounts] = {}
    pcol = step.row_partition_column
    cost = f"octet_length(i.{step.cost_column})" if step.cost_column else "0"
    cache_join, uncached = "", "TRUE"
    if step.cached_by_identity:
        cache_join = (
            "LEFT JOIN text_embedding_cache c ON c.model_id = :model AND c.text_sha256 = i.input_sha256 "
            "AND d.item_id IS NULL"
        )
        uncached = "c.text_sha256 IS NULL"
    sql = f"""
        WITH items AS ({step.scoped_items_sql(partitions=True)}),
        done AS (
            SELECT r.{pcol} AS partition_id, {step.item_key} AS item_id, r.input_sha256
            FROM {step.table.name} r
            WHERE r.{pcol} = ANY(:ids) AND r.step_version = :version AND r.model_id = :model
        ),
        fails AS (
            SELECT f.item_id, f.input_sha256, f.retry_at FROM embedding_failures f
            WHERE f.step = :step AND f.partition_id = ANY(:ids) AND f.step_version = :version
              AND f.model_id = :model AND f.retry_at > now()
        ),
        judged AS (
            SELECT i.partition_id, d.item_id IS NOT NULL AS done, f.item_id IS NOT NULL AS failed, f.retry_at,
                   CASE WHEN d.item_id IS NULL AND {uncached} THEN {cost} ELSE 0 END AS input_bytes
            FROM items i
            LEFT JOIN done d ON d.item_id = i.item_id AND d.input_sha256 = i.input_sha256
            LEFT JOIN fails f ON f.item_id = i.item_id AND f.input_sha256 = i.input_sha256 AND d.item_id IS NULL
            {cache_join}
        ),
        per_partition AS (
            SELECT partition_id, count(*) AS items,
                   count(*) FILTER (WHERE NOT done AND NOT failed) AS stale,
                   count(*) FILTER (WHERE failed) AS failed,
                   min(retry_at) AS retry_at, coalesce(sum(input_bytes), 0) AS input_bytes
            FROM judged GROUP BY partition_id
        ),
        strays AS (
            SELECT d.partition_id, count(*) FILTER (WHERE i.item_id IS NULL) AS stray_rows
            FROM done d LEFT JOIN items i ON i.item_id = d.item_id GROUP BY d.partition_id
        )
        SELECT coalesce(p.partition_id, s.partition_id) AS partition_id, p.items, p.stale, p.failed, p.retry_at,
               p.input_bytes, s.stray_rows, s.partition_id IS NOT NULL AS has_rows
        FROM per_partition p FULL JOIN strays s ON s.partition_id = p.partition_id
    """
    params = step.sql_params(models)
    for start in range(0, len(partition_ids), ITEM_LEVEL_BATCH):
        batch = partition_ids[start : start + ITEM_LEVEL_BATCH]
        for r in conn.execute(text(sql), params | {"ids": batch}):
            out[r.partition_id] = ItemCounts(
                r.items or 0,
                r.stale or 0,
                r.failed or 0,
                r.stray_rows or 0,
                int(r.input_bytes or 0),
                r.retry_at,
                r.has_rows,
            )
    return out


def partition_states(
    conn: Connection,
    step: Step,
    models: dict[str, str],
    *,
    owner_id: uuid.UUID | None = None,
    partition_ids: list[uuid.UUID] | None = None,
) -> dict[str, PartitionState]:
    """The state of every partition of ``step`` (READY videos, or owners), optionally only those of
    one owner or the given ones, under the model identities ``models`` (step name → identity)."""
    params = step.sql_params(models) | {
        "owner": owner_id,
        "ids": list(partition_ids or []),
        "sources": [*step.sources, step.table.name, *(t.name for t in step.extra_tables)],
        "inputs": list(step.sources),
    }
    same_model = "AND p.model_id = :model" if step.missing_per_model else ""
    # Changed since a ledger row: a stamp its run's read did not see (of the step's own rows: unless the
    # run wrote them itself).
    changed_since = """EXISTS (SELECT 1 FROM input_stamps st WHERE st.partition_id = u.id
        AND st.source = ANY(:sources) AND NOT pg_visible_in_snapshot(st.changed_xid, {alias}.read_snapshot)
        AND (st.source = ANY(:inputs) OR st.changed_xid <> {alias}.written_xid))"""
    if owner_id is None and partition_ids is None:  # every partition: one hash join over the stamps
        changed_current = "ch.partition_id IS NOT NULL"
        changed_join = """LEFT JOIN (
            SELECT DISTINCT st.partition_id FROM input_stamps st
            JOIN partition_ledger l2 ON l2.step = :step AND l2.partition_id = st.partition_id
                 AND l2.step_version = :version AND l2.model_id = :model
            WHERE st.source = ANY(:sources) AND NOT pg_visible_in_snapshot(st.changed_xid, l2.read_snapshot)
              AND (st.source = ANY(:inputs) OR st.changed_xid <> l2.written_xid)
        ) ch ON ch.partition_id = u.id"""
    else:  # a few partitions: one index probe each
        changed_current = "l.step IS NOT NULL AND " + changed_since.format(alias="l")
        changed_join = ""
    sql = f"""
        WITH u AS ({_universe_sql(step, owner_id is not None, partition_ids is not None)})
        SELECT u.id::text AS key, l.items, l.failed, l.retry_at, l.input_bytes, l.step IS NOT NULL AS current,
               {changed_current} AS changed,
               prev.step IS NOT NULL AS ever, prev.items AS prev_items, prev.input_bytes AS prev_bytes,
               prev.changed AS prev_changed
        FROM u
        LEFT JOIN partition_ledger l
               ON l.step = :step AND l.partition_id = u.id AND l.step_version = :version AND l.model_id = :model
        {changed_join}
        LEFT JOIN LATERAL (
            SELECT p.step, p.items, p.input_bytes, {changed_since.format(alias="p")} AS changed
            FROM partition_ledger p
            WHERE l.step IS NULL AND p.step = :step AND p.partition_id = u.id {same_model}
            ORDER BY p.written_at DESC LIMIT 1
        ) prev ON TRUE
    """
    rows = conn.execute(text(sql), params).all()
    # Plain tuples, not attribute access: this loop runs once per partition (100k and more).
    # (key, items, failed, retry_at, input_bytes, current, changed, ever, prev_items, prev_bytes, prev_changed)
    # Compared item by item: inputs changed since the ledger's read, or nothing to go by.
    exact = [r[0] for r in rows if (r[5] and r[6]) or (not r[5] and (not r[7] or r[10]))]
    counted = item_counts(conn, step, models, [uuid.UUID(k) for k in exact]) if exact else {}
    now = conn.execute(text("SELECT now()")).scalar_one()
    states: dict[str, PartitionState] = {}
    for key, items, failed, retry_at, _bytes, current, changed, ever, prev_items, prev_bytes, _ in rows:
        if current and not changed:  # exactly as its run left it
            if not failed:
                states[key] = PartitionState(key, "fresh", items, 0, 0, 0, retry_at)
                continue
            due = retry_at is None or retry_at <= now
            states[key] = PartitionState(
                key, "stale" if due else "failed", items, failed if due else 0, 0 if due else failed, 0, retry_at
            )
            continue
        c = counted.get(uuid.UUID(key))
        if c is not None:
            if not current and not ever and not c.has_rows:
                state = "missing"
            elif c.stale or c.stray_rows or (current and c.items != items):
                # Fewer items than the run wrote: some were deleted, with their rows (foreign keys)
                # but not with what lives outside the database (their search documents).
                state = "stale"
            else:
                state = "failed" if c.failed else "fresh"
            states[key] = PartitionState(key, state, c.items, c.stale, c.failed, c.input_bytes, c.retry_at)
        elif not current and not ever:  # never written, and no items: one (cheap) run records it
            states[key] = PartitionState(key, "missing", 0, 0, 0, 0)
        else:  # another generation's ledger, inputs unchanged since: every item is to redo (even none:
            # the candidate covers a partition only once a run has written its ledger)
            n = prev_items or 0
            states[key] = PartitionState(key, "stale", n, n, 0, int(prev_bytes or 0))
    return states


def summarize(states: dict[str, PartitionState]) -> dict[str, int]:
    """Partitions per state, every state present."""
    counts = Counter(s.state for s in states.values())
    return {state: counts.get(state, 0) for state in STATES}
