"""``reprocess``: the seed's reprocessing, launched from the Launchpad, as asset backfills.

Its run config is the seed's request (scope all|owner|video, ``video_id``, ``owner_id``, ``since``,
``force``, ``retry_failed``) plus ``steps`` (only those steps and their downstream) and ``dry_run``.
The op plans with ``plan_reprocess`` and submits, on the instance, backfills of the planned
partitions sized like the stale sensor's (about ``HEIMDEX_SCENES_PER_RUN`` scenes each), leaving
out what a queued or running backfill or run already covers (unless forced). A dry run only
reports the plan, in the logs and as metadata.
"""

import uuid
from datetime import datetime

import dagster as dg
from pydantic import Field

from heimdex_assets.models import expected_models, model_resources
from heimdex_assets.partitions import canonical_uuid
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.sensors.stale_partitions import (
    PARTITIONINGS,
    in_flight_partitions,
    launch_tags,
    partition_weights,
    plan_launches,
    scenes_per_run,
    submit_backfill,
)
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION
from heimdex_assets.steps import step_for_asset


class ReprocessConfig(dg.Config):
    """What to reprocess: the seed's request, ``since`` (ISO 8601), explicit failure retries, a dry run."""

    scope: str = Field(default="all", description="all, owner or video")
    video_id: str | None = Field(default=None, description="the video (scope video)")
    owner_id: str | None = Field(default=None, description="the owner (scope owner; with scope video, a check)")
    since: str | None = Field(default=None, description="only videos (and persons) updated since, ISO 8601")
    force: bool = Field(default=False, description="recompute every item, fresh or not")
    retry_failed: bool = Field(default=False, description="retry failed items within their backoff too")
    steps: list[str] | None = Field(
        default=None,
        description="only these steps (e.g. scene_text) or assets, and what depends on them; none: every step",
    )
    dry_run: bool = Field(default=False, description="report the plan; submit nothing")

    def request(self) -> ReprocessRequest:
        if self.scope not in ("all", "owner", "video"):
            raise ValueError(f"scope must be all, owner or video, not {self.scope!r}")
        return ReprocessRequest(
            scope=self.scope,  # type: ignore[arg-type]
            video_id=uuid.UUID(canonical_uuid(self.video_id, "video id")) if self.video_id else None,
            owner_id=uuid.UUID(canonical_uuid(self.owner_id, "owner id")) if self.owner_id else None,
            since=datetime.fromisoformat(self.since) if self.since else None,
            force=self.force,
            retry_failed=self.retry_failed,
            steps=tuple(self.steps) if self.steps else None,
        )


@dg.op(description="Plan the reprocessing of a scope and submit backfills of exactly its partitions.")
def reprocess_op(
    context: dg.OpExecutionContext,
    config: ReprocessConfig,
    db: AppDatabase,
    text_embedder: TextEmbedder,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
    search_index: SearchIndex,
) -> dg.Output[list[str]]:
    """The ids of the backfills submitted (none on a dry run); the plan as metadata."""
    resources = model_resources(text_embedder, clip, person_detector, search_index)
    with db.engine.connect() as conn:
        plan = plan_reprocess(conn, config.request(), expected_models(conn, resources))
        weights = {kind: partition_weights(conn, kind) for kind in PARTITIONINGS}
    metadata: dict[str, object] = {
        "partitions": {k: len(a.partitions) for k, a in plan.assets.items()},
        "items_stale": {k: a.items_stale for k, a in plan.assets.items()},
        "estimated_openai_cost_usd": round(plan.estimated_openai_cost_usd, 6),
        "dry_run": config.dry_run,
    }
    for asset_key, asset in plan.assets.items():
        if not asset.selected:
            context.log.info(f"{asset_key}: {asset.partitions_left} partitions stale, not redone (not selected)")
            continue
        context.log.info(f"{asset_key}: {len(asset.partitions)} partitions, {asset.items_stale} items to redo")
    instance = context.instance
    planned: dict[str, set[str]] = {kind: set() for kind in PARTITIONINGS}
    for asset_key, asset in plan.assets.items():
        planned[step_for_asset(asset_key).partitioning].update(asset.partitions)
    for kind, partitions_def in PARTITIONINGS.items():
        new = planned[kind] - set(instance.get_dynamic_partitions(partitions_def.name))
        if new and not config.dry_run:  # not discovered yet: register them, as the discovery sensors would
            instance.add_dynamic_partitions(partitions_def.name, sorted(new))
    ordered = {kind: instance.get_dynamic_partitions(p.name) for kind, p in PARTITIONINGS.items()}
    in_flight = set() if config.force else in_flight_partitions(instance, ordered)
    launches, left = plan_launches(plan, ordered, in_flight, weights, scenes_per_run(), max_launches=10_000)
    metadata |= {
        "backfills": len(launches),
        "backfill_partitions": [len(lc.partitions) for lc in launches],
        "backfill_scenes": [lc.scenes for lc in launches],
    }
    if config.dry_run:
        context.log.info(f"dry run: {len(launches)} backfills would be submitted; nothing submitted")
        return dg.Output([], metadata=metadata)
    tags = launch_tags(plan, f"reprocess/{context.run_id}")
    scope = f"owner {plan.owner_scope}" if plan.owner_scope else "all owners"
    description = f"heimdex reprocess, {scope}, embedding spec {LATEST_EMBEDDING_SPEC_VERSION}"
    ids = [submit_backfill(instance, lc, tags, description) for lc in launches]
    context.log.info(f"submitted {len(ids)} backfills: {', '.join(ids)}; {left} partitions left out")
    return dg.Output(ids, metadata=metadata | {"backfill_ids": ", ".join(ids)})


@dg.job(
    name="reprocess",
    description="Reprocess a scope (all, owner, video; since; force; retry failed; dry run) as asset backfills "
    "of exactly the partitions to redo, visible on the Backfills page.",
)
def reprocess_job() -> None:
    reprocess_op()
