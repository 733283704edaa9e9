"""What every video-partitioned asset does first: resolve the run's partition keys to videos.

A run may hold many videos (``BackfillPolicy.multi_run``); each key is validated, its video
loaded with its scenes, and its owner checked against the run's owner scope when one is set.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import dagster as dg
from sqlalchemy import Connection, select

from heimdex_assets.db.tables import scenes, videos
from heimdex_assets.partitions import InvalidIdError, parse_partition_key

# Run tags understood by the assets; launchers (sensor, CLI, API) set them.
OWNER_SCOPE_TAG = "heimdex/owner_id"
FORCE_TAG = "heimdex/force"
RETRY_FAILED_TAG = "heimdex/retry_failed"


@dataclass(frozen=True)
class Scene:
    """The fields of a scene that embedding steps read, with the database's input hashes."""

    id: uuid.UUID
    video_id: uuid.UUID
    owner_id: uuid.UUID
    scene_index: int
    start_s: float
    end_s: float
    transcript: str | None
    visual_description: str | None
    tags: tuple[str, ...]
    summary: str | None
    thumbnail_uri: str | None
    thumbnail_sha256: str | None
    transcript_sha256: str | None
    visual_sha256: str | None
    summary_sha256: str | None


@dataclass
class VideoRun:
    """The READY videos of a run with their scenes, and the keys that were left out and why."""

    owner_of: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    scenes_of: dict[uuid.UUID, list[Scene]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def all_scenes(self) -> list[Scene]:
        return [s for video in self.scenes_of.values() for s in video]

    def fail_if_rejected(self) -> None:
        """Raise once the good partitions are written, naming every key that could not be done."""
        raise_for_rejected(self.rejected)


def raise_for_rejected(rejected: dict[str, str]) -> None:
    """A dg.Failure listing every rejected partition key with its reason (nothing when none)."""
    if rejected:
        listed = "; ".join(f"{k}: {why}" for k, why in sorted(rejected.items()))
        raise dg.Failure(description=f"{len(rejected)} partition(s) could not be processed: {listed}")


def run_flag(context: dg.AssetExecutionContext, tag: str) -> bool:
    """Whether the run carries ``tag`` set to true."""
    return str(context.run.tags.get(tag, "")).lower() in ("1", "true", "yes")


def load_video_run(conn: Connection, keys: Sequence[str], owner_scope: str | None = None) -> VideoRun:
    """Validate ``keys`` and load their videos; non-READY videos are skipped, bad keys rejected."""
    run = VideoRun()
    ids: dict[uuid.UUID, str] = {}
    for key in keys:
        try:
            ids[parse_partition_key(key)] = key
        except InvalidIdError as exc:
            run.rejected[key] = str(exc)
    scope = uuid.UUID(owner_scope) if owner_scope else None
    found = conn.execute(select(videos.c.id, videos.c.owner_id, videos.c.status).where(videos.c.id.in_(list(ids))))
    seen = set()
    for video_id, owner_id, status in found:
        seen.add(video_id)
        key = ids[video_id]
        if scope is not None and owner_id != scope:
            run.rejected[key] = f"video {key} is not in the scope of owner {scope}"
        elif status != "READY":
            run.skipped[key] = f"video {key} is {status}, not READY: skipped"
        else:
            run.owner_of[video_id] = owner_id
    for video_id, key in ids.items():
        if video_id not in seen:
            run.rejected[key] = f"unknown video {key}"
    run.scenes_of = {v: [] for v in run.owner_of}
    if run.owner_of:
        rows = conn.execute(
            select(scenes)
            .where(scenes.c.video_id.in_(list(run.owner_of)))
            .order_by(scenes.c.video_id, scenes.c.scene_index)
        )
        for r in rows:
            run.scenes_of[r.video_id].append(
                Scene(
                    id=r.id,
                    video_id=r.video_id,
                    owner_id=r.owner_id,
                    scene_index=r.scene_index,
                    start_s=r.start_s,
                    end_s=r.end_s,
                    transcript=r.transcript,
                    visual_description=r.visual_description,
                    tags=tuple(r.tags or ()),
                    summary=r.summary,
                    thumbnail_uri=r.thumbnail_uri,
                    thumbnail_sha256=r.thumbnail_sha256,
                    transcript_sha256=r.transcript_sha256,
                    visual_sha256=r.visual_sha256,
                    summary_sha256=r.summary_sha256,
                )
            )
    return run
