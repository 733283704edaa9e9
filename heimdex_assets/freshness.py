"""Which partitions must be redone: authoritative, computed by SQL over the application database.

A video partition is, for an asset:
- ``missing`` when the asset never wrote anything for it (at any version);
- ``stale`` when some item has no row at the current step version, made by the model configured
  now, with the current input hash, and no recent failure for that same input;
- ``failed`` when every such item has a failure recorded for its current input within the backoff;
- ``fresh`` otherwise (a video without items is fresh).
One aggregate query per asset answers for every READY video at once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, text

from heimdex_assets.spec import SPEC

FAILURE_BACKOFF = timedelta(hours=24)

# The items of each video asset: (video_id, item_id, input hash) of READY videos, mirroring the
# asset's own rules (a blank channel has no item; a scene with no thumbnail still is one).
_TEXT_ITEMS = r"""
    SELECT s.video_id, s.owner_id, s.id::text || ':' || c.channel AS item_id, s.id AS scene_id, c.channel, c.sha
    FROM scenes s
    JOIN videos v ON v.id = s.video_id AND v.status = 'READY'
    CROSS JOIN LATERAL (VALUES
        ('transcript', CASE WHEN s.transcript ~ '\S' THEN s.transcript_sha256 END),
        ('visual', CASE WHEN coalesce(s.visual_description, '') ~ '\S'
                         OR array_to_string(s.tags, '') ~ '\S' THEN s.visual_sha256 END),
        ('summary', CASE WHEN s.summary ~ '\S' THEN s.summary_sha256 END)
    ) AS c(channel, sha)
    WHERE c.channel = ANY(:channels) AND c.sha IS NOT NULL {scope}
"""

_SCENE_ITEMS = """
    SELECT s.video_id, s.owner_id, s.id::text AS item_id, s.id AS scene_id, s.thumbnail_sha256 AS sha
    FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY'
    WHERE TRUE {scope}
"""

# (items query, vector table, join condition on the item, step name)
_VIDEO_ASSETS = {
    "scene_text_embeddings": (
        _TEXT_ITEMS,
        "scene_text_vectors",
        "r.scene_id = i.scene_id AND r.channel = i.channel AND r.input_sha256 = i.sha",
        "scene_text",
    ),
    "scene_clip_embeddings": (
        _SCENE_ITEMS,
        "scene_clip_vectors",
        # Without a declared thumbnail hash, any row of the right version and model will do.
        "r.scene_id = i.scene_id AND r.input_sha256 = coalesce(i.sha, r.input_sha256)",
        "scene_clip",
    ),
    "scene_person_embeddings": (
        _SCENE_ITEMS,
        "scene_person_scans",  # one row per searched scene, people found or not
        "r.scene_id = i.scene_id AND r.input_sha256 = coalesce(i.sha, r.input_sha256)",
        "scene_person",
    ),
}

STATUS_ASSETS = tuple(_VIDEO_ASSETS)


@dataclass(frozen=True)
class PartitionState:
    """One partition's state for one asset, with its item counts."""

    key: str
    state: str
    items: int
    stale_items: int
    failed_items: int


def video_partition_states(
    conn: Connection,
    asset_key: str,
    model_id: str,
    *,
    owner_id: uuid.UUID | None = None,
    video_ids: list[uuid.UUID] | None = None,
) -> dict[str, PartitionState]:
    """The state of every READY video (optionally of one owner or some videos) for ``asset_key``."""
    items_sql, table, match, step_name = _VIDEO_ASSETS[asset_key]
    step = SPEC.step(step_name)
    scope = ""
    params: dict[str, object] = {
        "version": step.version,
        "model": model_id,
        "channels": list(step.enabled_channels),
        "step": step_name,
        "backoff": FAILURE_BACKOFF,
    }
    if owner_id is not None:
        scope += " AND s.owner_id = :owner"
        params["owner"] = owner_id
    if video_ids is not None:
        scope += " AND s.video_id = ANY(:videos)"
        params["videos"] = list(video_ids)
    sql = f"""
        WITH items AS ({items_sql.format(scope=scope)}),
        judged AS (
            SELECT i.video_id,
                   r.scene_id IS NOT NULL AS done,
                   f.item_id IS NOT NULL AS failed
            FROM items i
            LEFT JOIN {table} r ON r.step_version = :version AND r.model_id = :model AND {match}
            LEFT JOIN embedding_failures f ON f.step = :step AND f.step_version = :version
                 AND f.item_id = i.item_id AND f.model_id = :model
                 AND f.input_sha256 = coalesce(i.sha, f.input_sha256)
                 AND f.failed_at > now() - :backoff
        )
        SELECT video_id, count(*) AS items,
               count(*) FILTER (WHERE NOT done AND NOT failed) AS stale,
               count(*) FILTER (WHERE NOT done AND failed) AS failed
        FROM judged GROUP BY video_id
    """
    counts = {row.video_id: row for row in conn.execute(text(sql), params)}
    ready_sql = "SELECT v.id FROM videos v WHERE v.status = 'READY'"
    if owner_id is not None:
        ready_sql += " AND v.owner_id = :owner"
    if video_ids is not None:
        ready_sql += " AND v.id = ANY(:videos)"
    ready = list(conn.execute(text(ready_sql), params).scalars())
    touched = set(conn.execute(text(f"SELECT DISTINCT video_id FROM {table}")).scalars())
    touched |= set(
        conn.execute(text("SELECT DISTINCT video_id FROM embedding_failures WHERE step = :step"), params).scalars()
    )
    states = {}
    for video_id in ready:
        row = counts.get(video_id)
        items, stale, failed = (row.items, row.stale, row.failed) if row else (0, 0, 0)
        if video_id not in touched and items:
            state = "missing"
        elif stale:
            state = "stale"
        elif failed:
            state = "failed"
        else:
            state = "fresh"
        states[str(video_id)] = PartitionState(str(video_id), state, items, stale, failed)
    return states


def summarize(states: dict[str, PartitionState]) -> dict[str, int]:
    """Partitions per state, every state present."""
    counts = Counter(s.state for s in states.values())
    return {state: counts.get(state, 0) for state in ("fresh", "stale", "missing", "failed")}
