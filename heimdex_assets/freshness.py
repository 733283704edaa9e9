"""Which partitions must be redone: authoritative, computed by SQL over the application database.

A partition (a READY video, or an owner) is, for an asset:
- ``missing`` when the asset never wrote anything for it (at any version);
- ``stale`` when some item has no row at the current step version, made by the model configured
  now, with the current input hash, and no recent failure for that same input;
- ``failed`` when every such item has a failure recorded for its current input within the backoff;
- ``fresh`` otherwise (a partition without items is fresh).
One aggregate query per asset answers for every partition at once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, text

from heimdex_assets.spec import SPEC

FAILURE_BACKOFF = timedelta(hours=24)


@dataclass(frozen=True)
class FreshnessRule:
    """How to judge one asset: its items (SQL yielding partition_id, owner_id, item_id, sha and the
    columns ``done`` refers to), the table its rows live in, and when a row makes an item done."""

    step: str
    partition: str  # "video" or "owner"
    items: str
    table: str
    done: str
    owner_column: str = "s.owner_id"  # in ``items``: narrows to one owner
    partition_column: str = "s.video_id"  # in ``items``: narrows to some partitions


# Each items query mirrors its asset's own rules (a blank channel has no item; a scene without a
# thumbnail still is one, and fails). ``{scope}`` narrows to an owner or to some partitions.
_READY_SCENES = "FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY' WHERE TRUE {scope}"
_SCENE_ITEMS = (
    "SELECT s.video_id AS partition_id, s.owner_id, s.id::text AS item_id, s.id AS scene_id, "
    "s.thumbnail_sha256 AS sha, s.updated_at " + _READY_SCENES
)
# Without a declared thumbnail hash, a row of the right version and model will do.
_SAME_THUMBNAIL = "r.scene_id = i.scene_id AND r.model_id = :model AND r.input_sha256 = coalesce(i.sha, r.input_sha256)"

RULES = {
    "scene_text_embeddings": FreshnessRule(
        "scene_text",
        "video",
        r"""SELECT s.video_id AS partition_id, s.owner_id, s.id::text || ':' || c.channel AS item_id,
                   s.id AS scene_id, c.channel, c.sha
            FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY'
            CROSS JOIN LATERAL (VALUES
                ('transcript', CASE WHEN s.transcript ~ '\S' THEN s.transcript_sha256 END),
                ('visual', CASE WHEN coalesce(s.visual_description, '') ~ '\S'
                                 OR array_to_string(s.tags, '') ~ '\S' THEN s.visual_sha256 END),
                ('summary', CASE WHEN s.summary ~ '\S' THEN s.summary_sha256 END)
            ) AS c(channel, sha)
            WHERE c.channel = ANY(:channels) AND c.sha IS NOT NULL {scope}""",
        "scene_text_vectors",
        "r.scene_id = i.scene_id AND r.channel = i.channel AND r.model_id = :model AND r.input_sha256 = i.sha",
    ),
    "scene_clip_embeddings": FreshnessRule("scene_clip", "video", _SCENE_ITEMS, "scene_clip_vectors", _SAME_THUMBNAIL),
    # One scan row per searched scene, people found or not.
    "scene_person_embeddings": FreshnessRule(
        "scene_person", "video", _SCENE_ITEMS, "scene_person_scans", _SAME_THUMBNAIL
    ),
    # The ledger of indexed documents: done when indexed since the scene last changed.
    "scene_search_index": FreshnessRule(
        "scene_search",
        "video",
        _SCENE_ITEMS,
        "scene_search_documents",
        "r.scene_id = i.scene_id AND r.indexed_at >= i.updated_at",
    ),
    "person_photo_embeddings": FreshnessRule(
        "person_photo",
        "owner",
        "SELECT p.owner_id AS partition_id, p.owner_id, p.id::text AS item_id, p.id AS photo_id, p.sha256 AS sha "
        "FROM person_reference_photos p WHERE TRUE {scope}",
        "person_photo_vectors",
        "r.photo_id = i.photo_id AND r.model_id = :model AND r.input_sha256 = coalesce(i.sha, r.input_sha256)",
        owner_column="p.owner_id",
        partition_column="p.owner_id",
    ),
    # A person's input: the set of its READY photo vectors (same hash as person_query.photo_set_sha256).
    "person_query_embeddings": FreshnessRule(
        "person_query",
        "owner",
        """SELECT pr.owner_id AS partition_id, pr.owner_id, pr.id::text AS item_id, pr.id AS person_id, ps.sha
           FROM persons pr CROSS JOIN LATERAL (
               SELECT encode(sha256(convert_to(string_agg(line, E'\\n' ORDER BY line COLLATE "C"), 'UTF8')), 'hex')
                      AS sha
               FROM (SELECT v.photo_id::text || ':' || v.input_sha256 AS line
                     FROM person_photo_vectors v
                     JOIN person_reference_photos p ON p.id = v.photo_id AND p.status = 'READY'
                     WHERE v.person_id = pr.id AND v.step_version = :photo_version AND v.model_id = :model) lines
           ) ps
           WHERE ps.sha IS NOT NULL {scope}""",
        "person_query_vectors",
        "r.person_id = i.person_id AND r.model_id = :model AND r.input_sha256 = i.sha",
        owner_column="pr.owner_id",
        partition_column="pr.owner_id",
    ),
}
STATUS_ASSETS = tuple(RULES)


@dataclass(frozen=True)
class PartitionState:
    """One partition's state for one asset, with its item counts."""

    key: str
    state: str
    items: int
    stale_items: int
    failed_items: int


def partition_states(
    conn: Connection,
    asset_key: str,
    model_id: str,
    *,
    owner_id: uuid.UUID | None = None,
    partition_ids: list[uuid.UUID] | None = None,
) -> dict[str, PartitionState]:
    """The state of every partition of ``asset_key`` (READY videos, or owners), optionally only
    those of one owner or the given ones."""
    rule = RULES[asset_key]
    step = SPEC.step(rule.step)
    params: dict[str, object] = {
        "version": step.version,
        "model": model_id,
        "channels": list(step.enabled_channels),
        "step": rule.step,
        "backoff": FAILURE_BACKOFF,
        "photo_version": SPEC.step("person_photo").version,
        "owner": owner_id,
        "ids": list(partition_ids or []),
    }
    scope = (f" AND {rule.owner_column} = :owner" if owner_id else "") + (
        f" AND {rule.partition_column} = ANY(:ids)" if partition_ids is not None else ""
    )
    # Hash joins against this version's rows and failures (each matches at most once: both are keyed
    # by item and version) answer for every partition in one pass instead of a probe per item.
    sql = f"""
        WITH items AS ({rule.items.format(scope=scope)}),
        judged AS (
            SELECT i.partition_id,
                   r.step_version IS NOT NULL AS done,
                   f.step IS NOT NULL AS failed
            FROM items i
            LEFT JOIN {rule.table} r ON r.step_version = :version AND {rule.done}
            LEFT JOIN embedding_failures f ON f.step = :step AND f.step_version = :version
                 AND f.item_id = i.item_id AND f.model_id = :model
                 AND f.input_sha256 = coalesce(i.sha, f.input_sha256)
                 AND f.failed_at > now() - :backoff
        )
        SELECT partition_id, count(*) AS items,
               count(*) FILTER (WHERE NOT done AND NOT failed) AS stale,
               count(*) FILTER (WHERE NOT done AND failed) AS failed
        FROM judged GROUP BY partition_id
    """
    counts = {row.partition_id: row for row in conn.execute(text(sql), params)}
    if rule.partition == "video":
        universe = "SELECT v.id FROM videos v WHERE v.status = 'READY'"
        universe += (" AND v.owner_id = :owner" if owner_id else "") + (
            " AND v.id = ANY(:ids)" if partition_ids is not None else ""
        )
        touched_sql = f"SELECT DISTINCT video_id FROM {rule.table}"
        failed_sql = "SELECT DISTINCT video_id FROM embedding_failures WHERE step = :step"
    else:
        universe = "SELECT o.id FROM owners o WHERE TRUE"
        universe += (" AND o.id = :owner" if owner_id else "") + (
            " AND o.id = ANY(:ids)" if partition_ids is not None else ""
        )
        touched_sql = f"SELECT DISTINCT owner_id FROM {rule.table}"
        failed_sql = "SELECT DISTINCT owner_id FROM embedding_failures WHERE step = :step"
    touched = set(conn.execute(text(touched_sql)).scalars()) | set(conn.execute(text(failed_sql), params).scalars())
    states = {}
    for partition_id in conn.execute(text(universe), params).scalars():
        row = counts.get(partition_id)
        items, stale, failed = (row.items, row.stale, row.failed) if row else (0, 0, 0)
        if partition_id not in touched and items:
            state = "missing"
        elif stale:
            state = "stale"
        elif failed:
            state = "failed"
        else:
            state = "fresh"
        states[str(partition_id)] = PartitionState(str(partition_id), state, items, stale, failed)
    return states


def video_partition_states(
    conn: Connection,
    asset_key: str,
    model_id: str,
    *,
    owner_id: uuid.UUID | None = None,
    video_ids: list[uuid.UUID] | None = None,
) -> dict[str, PartitionState]:
    """``partition_states`` of a video-partitioned asset."""
    return partition_states(conn, asset_key, model_id, owner_id=owner_id, partition_ids=video_ids)


def summarize(states: dict[str, PartitionState]) -> dict[str, int]:
    """Partitions per state, every state present."""
    counts = Counter(s.state for s in states.values())
    return {state: counts.get(state, 0) for state in ("fresh", "stale", "missing", "failed")}
