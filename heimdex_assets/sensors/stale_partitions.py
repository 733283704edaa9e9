"""``stale_partitions_sensor``: backfills exactly the partitions that the embedding spec makes stale.

Each asset's rows carry the step version of the spec; after a spec bump (or an edited scene, a
new READY video, another configured model) the SQL freshness of ``freshness.py`` names the
partitions to redo, and this sensor requests runs for them: assets that redo the same partitions
share a run, keys are cut into contiguous ranges of at most the assets' ``max_partitions_per_run``.
Failed partitions are left alone: they wait for the failure backoff of ``freshness.py``.
"""

import json
import time
from dataclasses import dataclass

import dagster as dg

from heimdex_assets.assets import DERIVED_ASSETS
from heimdex_assets.launch import RANGE_END_TAG, RANGE_START_TAG, contiguous_ranges
from heimdex_assets.models import expected_models
from heimdex_assets.partitions import owners_partitions, videos_partitions
from heimdex_assets.reprocess import ReprocessPlan, ReprocessRequest, partition_groups, plan_reprocess, plan_tags
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.steps import step_for_asset

MAX_RUN_REQUESTS_PER_TICK = 200
# A requested range is not requested again for this long: time for its run to be queued and done.
RELAUNCH_AFTER_SECONDS = 3600
PARTITIONINGS = {"video": videos_partitions, "owner": owners_partitions}
_ASSETS = {a.key.to_user_string(): a for a in DERIVED_ASSETS}


@dataclass(frozen=True)
class LaunchedRange:
    """A range of partitions requested for some assets at some time (epoch seconds); the cursor's unit."""

    at: float
    partitioning: str
    asset_keys: tuple[str, ...]
    start: str
    end: str


def read_cursor(cursor: str | None) -> list[LaunchedRange]:
    """The ranges recorded in a cursor written by ``write_cursor`` (none for an empty cursor)."""
    if not cursor:
        return []
    return [
        LaunchedRange(r["at"], r["partitioning"], tuple(r["assets"]), r["start"], r["end"])
        for r in json.loads(cursor)["launched"]
    ]


def write_cursor(launched: list[LaunchedRange]) -> str:
    """The cursor holding ``launched``: ranges, not keys, so it stays small (200 ranges a tick at most)."""
    entries = [
        {"at": r.at, "partitioning": r.partitioning, "assets": list(r.asset_keys), "start": r.start, "end": r.end}
        for r in launched
    ]
    return json.dumps({"launched": entries}, separators=(",", ":"))


def launched_partitions(launched: list[LaunchedRange], ordered: dict[str, list[str]]) -> set[tuple[str, str]]:
    """(asset, partition) pairs covered by ``launched``, each range read in its partitions' order
    ``ordered`` as Dagster reads the range tags; a range whose end was deleted covers nothing."""
    positions = {kind: {key: i for i, key in enumerate(keys)} for kind, keys in ordered.items()}
    pairs = set()
    for r in launched:
        start, end = positions[r.partitioning].get(r.start), positions[r.partitioning].get(r.end)
        if start is not None and end is not None:
            covered = ordered[r.partitioning][start : end + 1]
            pairs |= {(asset, key) for asset in r.asset_keys for key in covered}
    return pairs


def run_request_for(keys: list[str], asset_keys: list[str], tags: dict[str, str]) -> dg.RunRequest:
    """One run of ``asset_keys`` over the contiguous ``keys``: a partition key for one, range tags for more
    (``RunRequest`` has no partition range argument in Dagster 1.13; it reads these same tags)."""
    selection = [dg.AssetKey(k) for k in asset_keys]
    if len(keys) == 1:
        return dg.RunRequest(asset_selection=selection, partition_key=keys[0], tags=tags)
    return dg.RunRequest(asset_selection=selection, tags=tags | {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]})


def plan_launches(
    plan: ReprocessPlan,
    ordered: dict[str, list[str]],
    launched: set[tuple[str, str]],
    max_requests: int = MAX_RUN_REQUESTS_PER_TICK,
) -> tuple[list[tuple[str, list[str], list[str]]], int]:
    """The ranges to request now, as (partitioning, asset keys, keys), and how many partitions of the plan
    wait for a later tick. Keys not registered yet in ``ordered`` and pairs in ``launched`` are left out
    (``plan`` is narrowed in place, so that assets still redoing the same keys share a run)."""
    for asset_key, asset in plan.assets.items():
        registered = set(ordered[step_for_asset(asset_key).partitioning])
        asset.partitions = [k for k in asset.partitions if k in registered and (asset_key, k) not in launched]
    ranges, left = [], 0
    for group in partition_groups(plan):
        per_run = min(_ASSETS[k].backfill_policy.max_partitions_per_run for k in group.asset_keys)
        for keys in contiguous_ranges(ordered[group.partitioning], set(group.partitions), per_run):
            if len(ranges) < max_requests:
                ranges.append((group.partitioning, group.asset_keys, keys))
            else:
                left += len(keys)
    return ranges, left


@dg.sensor(
    name="stale_partitions_sensor",
    minimum_interval_seconds=300,
    # Off until an operator turns it on: a spec bump re-embeds every partition, which spends model
    # money (OpenAI tokens, GPU hours); the tick logs the OpenAI estimate before the runs start.
    default_status=dg.DefaultSensorStatus.STOPPED,
    asset_selection=dg.AssetSelection.assets(*DERIVED_ASSETS),
    description="Requests runs for the partitions the embedding spec makes stale or missing; not failed ones.",
)
def stale_partitions_sensor(
    context: dg.SensorEvaluationContext,
    db: AppDatabase,
    text_embedder: TextEmbedder,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
    search_index: SearchIndex,
) -> dg.SensorResult:
    """Runs for every stale or missing registered partition, grouped by asset and in ranges, 200 at most a tick;
    a range is not requested again within an hour (cursor)."""
    now = time.time()
    recent = [r for r in read_cursor(context.cursor) if now - r.at < RELAUNCH_AFTER_SECONDS]
    with db.engine.connect() as conn:
        resources = {
            "text_embedder": text_embedder,
            "clip": clip,
            "person_detector": person_detector,
            "search_index": search_index,
        }
        plan = plan_reprocess(conn, ReprocessRequest(scope="all"), expected_models(conn, resources))
    if plan.empty:
        return dg.SensorResult(skip_reason=dg.SkipReason("every partition is fresh"), cursor=write_cursor(recent))
    cost = plan.estimated_openai_cost_usd
    ordered = {kind: context.instance.get_dynamic_partitions(p.name) for kind, p in PARTITIONINGS.items()}
    ranges, left = plan_launches(plan, ordered, launched_partitions(recent, ordered))
    tags = plan_tags(plan)
    requests = [run_request_for(keys, asset_keys, tags) for _, asset_keys, keys in ranges]
    recent += [LaunchedRange(now, kind, tuple(asset_keys), keys[0], keys[-1]) for kind, asset_keys, keys in ranges]
    context.log.info(
        f"{len(requests)} run requests over {sum(len(k) for *_, k in ranges)} partitions "
        f"(whole plan: estimated OpenAI cost ${cost:.4f}); {left} partitions left for later ticks"
    )
    if not requests:
        skip = "every stale partition has a run requested within the hour or is not registered yet"
        return dg.SensorResult(skip_reason=dg.SkipReason(skip), cursor=write_cursor(recent))
    return dg.SensorResult(run_requests=requests, cursor=write_cursor(recent))
