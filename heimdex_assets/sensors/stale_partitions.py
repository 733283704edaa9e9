"""``stale_partitions_sensor``: backfills exactly the partitions that the embedding spec makes stale.

Each asset's rows carry the step version of the spec; after a spec bump (or an edited scene, a
new READY video, another configured model) the SQL freshness of ``freshness.py`` names the
partitions to redo, and this sensor submits asset backfills for them (the Backfills page shows
their progress). Assets that redo the same partitions share a backfill; each backfill is one run's
worth of work, about ``scenes_per_run()`` scenes (``pack_runs``); partitions that a queued or
running backfill or run already covers are never submitted again (``in_flight_partitions``).
Failed partitions are left alone: they wait for the failure backoff of ``freshness.py``.
It runs by default, behind the spend guard (``spend_guard.py``): a plan whose OpenAI estimate would take the
day's automatic spend over the ceiling is recorded as waiting for approval and nothing is launched.
The ``reprocess`` job (``heimdex_assets.jobs``) submits its plans through the same functions.
"""

import copy
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

from heimdex_assets.assets import DERIVED_ASSETS
from heimdex_assets.launch import (
    MAX_BRIDGED_FRESH,
    RANGE_END_TAG,
    RANGE_START_TAG,
    pack_runs,
    partition_weights,
    scenes_per_run,
)
from heimdex_assets.models import expected_models, model_resources
from heimdex_assets.partitions import owners_partitions, videos_partitions
from heimdex_assets.reprocess import (
    ReprocessPlan,
    ReprocessRequest,
    estimate_openai,
    partition_groups,
    plan_reprocess,
    plan_tags,
)
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.spend_guard import SpendCeiling, judge, lock_guard, record_plan, supersede_waiting
from heimdex_assets.steps import step_for_asset

MAX_BACKFILLS_PER_TICK = 200
LAUNCHED_BY_TAG = "heimdex/launched_by"
# Runs in these states will still write their partitions.
IN_FLIGHT_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
PARTITIONINGS = {"video": videos_partitions, "owner": owners_partitions}
SENSOR_NAME = "stale_partitions_sensor"
# `stopped` ships the sensor off (a deployment that launches only by hand, or a test driving ticks itself);
# the state set in the UI always wins over this default.
DEFAULT_STATUS_ENV = "HEIMDEX_STALE_SENSOR_DEFAULT"
_ASSETS = {a.key.to_user_string(): a for a in DERIVED_ASSETS}


def _partition_keys(tags: Mapping[str, str], positions: Mapping[str, int], ordered: Sequence[str]) -> list[str]:
    """The partitions a run covers, from its tags, as Dagster reads them (a deleted range end: none)."""
    if "dagster/partition" in tags:
        return [tags["dagster/partition"]]
    start, end = positions.get(tags.get(RANGE_START_TAG, "")), positions.get(tags.get(RANGE_END_TAG, ""))
    return list(ordered[start : end + 1]) if start is not None and end is not None else []


def in_flight_partitions(instance: dg.DagsterInstance, ordered: Mapping[str, Sequence[str]]) -> set[tuple[str, str]]:
    """(asset, partition) pairs that a backfill still in progress targets, or a queued or running run
    will write; ``ordered``: each partitioning's keys in order, to read range runs."""
    pairs = {
        (key.to_user_string(), partition)
        for backfill in _backfills_in_progress(instance)
        for key, partition in _backfill_targets(backfill)
    }
    kinds = {name: step_for_asset(name).partitioning for name in _ASSETS}
    positions = {kind: {key: i for i, key in enumerate(keys)} for kind, keys in ordered.items()}
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT_RUN_STATUSES)):
        for asset_key in run.asset_selection or ():
            name = asset_key.to_user_string()
            if name in kinds:
                kind = kinds[name]
                pairs |= {(name, k) for k in _partition_keys(run.tags, positions[kind], ordered[kind])}
    return pairs


@dataclass(frozen=True)
class Launch:
    """One backfill to submit, one run's worth: its assets over a contiguous slice of partitions."""

    partitioning: str
    asset_keys: list[str]
    partitions: list[str]  # the slice, fresh partitions carried between stale ones included
    stale: int  # partitions of the slice that the plan redoes
    scenes: int  # their work (scenes, or photos for owners)


def plan_launches(
    plan: ReprocessPlan,
    ordered: Mapping[str, Sequence[str]],
    in_flight: set[tuple[str, str]],
    weights: Mapping[str, Mapping[str, int]],
    per_run: int,
    max_launches: int = MAX_BACKFILLS_PER_TICK,
) -> tuple[list[Launch], int]:
    """The backfills to submit now, and how many partitions of the plan wait for a later tick. Keys not
    registered yet in ``ordered`` and pairs in ``in_flight`` are left out (``plan`` is narrowed in place,
    so that assets still redoing the same keys share a backfill)."""
    for asset_key, asset in plan.assets.items():
        registered = set(ordered[step_for_asset(asset_key).partitioning])
        asset.partitions = [k for k in asset.partitions if k in registered and (asset_key, k) not in in_flight]
    launches: list[Launch] = []
    left = 0
    for group in partition_groups(plan):
        stale = set(group.partitions)
        # One backfill must be one run: never more partitions than the assets' backfill policy puts in one.
        cap = min(_ASSETS[k].backfill_policy.max_partitions_per_run or 1 for k in group.asset_keys)
        blocked = {k for a, k in in_flight if a in group.asset_keys}
        group_weights = weights[group.partitioning]
        # A forced plan recomputes every item of a run: carry no partition it did not ask for.
        bridged = 0 if plan.request.force else MAX_BRIDGED_FRESH
        for keys in pack_runs(ordered[group.partitioning], stale, group_weights, per_run, cap, blocked, bridged):
            redo = [k for k in keys if k in stale]
            if len(launches) < max_launches:
                work = sum(max(1, group_weights.get(k, 0)) for k in redo)
                launches.append(Launch(group.partitioning, group.asset_keys, keys, len(redo), work))
            else:
                left += len(redo)
    return launches, left


def launch_tags(plan: ReprocessPlan, launched_by: str) -> dict[str, str]:
    """The plan's run tags (owner scope, force, retry) and who launched it."""
    return plan_tags(plan) | {LAUNCHED_BY_TAG: launched_by}


# Dagster 1.13.27 has no public API to submit an asset backfill from a sensor or an op, nor to list
# backfills by status: these three functions are the only places that touch dagster._ (checked
# against dagster 1.13.27).
def backfill_request(launch: Launch, tags: Mapping[str, str]) -> dg.RunRequest:
    """A sensor's request for an asset backfill of ``launch`` (the sensor daemon submits it)."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

    subset = PARTITIONINGS[launch.partitioning].empty_subset().with_partition_keys(launch.partitions)
    graph_subset = AssetGraphSubset(
        partitions_subsets_by_asset_key={dg.AssetKey(k): subset for k in launch.asset_keys},
        non_partitioned_asset_keys=set(),
    )
    return dg.RunRequest.for_asset_graph_subset(graph_subset, tags=dict(tags))


def submit_backfill(instance: dg.DagsterInstance, launch: Launch, tags: Mapping[str, str], description: str) -> str:
    """Submit an asset backfill of ``launch`` to ``instance`` (the backfill daemon runs it); its id."""
    from dagster._core.execution.backfill import PartitionBackfill

    backfill_id = uuid.uuid4().hex[:8]
    instance.add_backfill(
        PartitionBackfill.from_asset_graph_subset(
            backfill_id=backfill_id,
            dynamic_partitions_store=instance,
            backfill_timestamp=time.time(),
            asset_graph_subset=backfill_request(launch, tags).asset_graph_subset,
            tags=dict(tags),
            title=None,
            description=description,
            run_config=None,
        )
    )
    return backfill_id


def _backfills_in_progress(instance: dg.DagsterInstance) -> list:
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    statuses = [BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING, BulkActionStatus.FAILING]
    return list(instance.get_backfills(filters=BulkActionsFilter(statuses=statuses)))


def _backfill_targets(backfill: object) -> list[tuple[dg.AssetKey, str]]:
    data = getattr(backfill, "asset_backfill_data", None)
    if data is None:  # a job backfill: no asset of ours
        return []
    return [(p.asset_key, p.partition_key) for p in data.target_subset.iterate_asset_partitions()]


def _default_status() -> dg.DefaultSensorStatus:
    stopped = os.environ.get(DEFAULT_STATUS_ENV, "").strip().lower() == "stopped"
    return dg.DefaultSensorStatus.STOPPED if stopped else dg.DefaultSensorStatus.RUNNING


def launched_part(plan: ReprocessPlan, launches: Sequence[Launch]) -> ReprocessPlan:
    """A copy of ``plan`` holding only the partitions that ``launches`` redo (this tick's share of it)."""
    pairs = {(a, k) for lc in launches for a in lc.asset_keys for k in lc.partitions}
    part = copy.deepcopy(plan)
    for asset_key, asset in part.assets.items():
        asset.partitions = [k for k in asset.partitions if (asset_key, k) in pairs]
    return part


@dg.sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=300,
    # On by default: the spend guard holds back any plan whose OpenAI estimate is over the day's ceiling.
    default_status=_default_status(),
    asset_selection=dg.AssetSelection.assets(*DERIVED_ASSETS),
    description="Backfills the partitions the embedding spec makes stale or missing (not failed ones), "
    "runs sized by scenes; never what a queued or running backfill or run covers. A plan over the daily "
    "OpenAI ceiling (HEIMDEX_AUTO_MAX_TOKENS_PER_DAY / _USD_PER_DAY) waits for `heimdex approve`.",
)
def stale_partitions_sensor(
    context: dg.SensorEvaluationContext,
    db: AppDatabase,
    text_embedder: TextEmbedder,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
    search_index: SearchIndex,
) -> dg.SensorResult:
    """Backfills for every stale or missing registered partition not already in flight, one run's
    worth each, 200 at most a tick, when the spend guard lets the plan start."""
    resources = model_resources(text_embedder, clip, person_detector, search_index)
    ceiling = SpendCeiling.from_env()
    with db.engine.connect() as conn:
        models = expected_models(conn, resources)
        plan = plan_reprocess(conn, ReprocessRequest(scope="all"), models)
        if plan.empty:
            return dg.SensorResult(skip_reason=dg.SkipReason("every partition is fresh"))
        weights = {kind: partition_weights(conn, kind) for kind in PARTITIONINGS}
    ordered = {kind: context.instance.get_dynamic_partitions(p.name) for kind, p in PARTITIONINGS.items()}
    in_flight = in_flight_partitions(context.instance, ordered)
    launches, left = plan_launches(plan, ordered, in_flight, weights, scenes_per_run())
    if not launches:
        skip = "every stale partition is in a queued or running backfill or run, or not registered yet"
        return dg.SensorResult(skip_reason=dg.SkipReason(skip))
    with db.transaction() as conn:
        lock_guard(conn)
        # The guard judges the whole plan left to launch (this tick's backfills and later ticks'), not a slice.
        estimate_openai(conn, plan, models)
        verdict = judge(conn, ceiling, plan.estimated_openai_tokens, plan.estimated_openai_cost_usd)
        if not verdict.allowed:
            stored, new = record_plan(conn, plan, created_by=SENSOR_NAME, status="waiting", reason=verdict.reason)
            message = (
                f"plan {stored.id} ({stored.partitions} asset partitions, estimated {stored.estimated_tokens:,} "
                f"tokens, ${stored.estimated_usd:.4f}) waits for approval: {verdict.reason}; "
                f"launch it with `heimdex approve {stored.id}`"
            )
            if new:
                context.log.warning(message)
            return dg.SensorResult(skip_reason=dg.SkipReason(message))
        launched = plan if not left else launched_part(plan, launches)
        if left:
            estimate_openai(conn, launched, models)
        # What starts now replaces any plan still waiting: this is the stale set as it stands.
        supersede_waiting(conn)
        record_plan(conn, launched, created_by=SENSOR_NAME, status="launched", reason=verdict.reason)
    context.log.info(
        f"{len(launches)} backfills over {sum(lc.stale for lc in launches)} stale partitions "
        f"({sum(len(lc.partitions) for lc in launches)} with the fresh ones carried), "
        f"{sum(lc.scenes for lc in launches)} scenes, estimated OpenAI cost {launched.estimated_openai_tokens:,} "
        f"tokens, ${launched.estimated_openai_cost_usd:.4f} ({verdict.reason}); {left} partitions left for later ticks"
    )
    tags = launch_tags(plan, SENSOR_NAME)
    return dg.SensorResult(run_requests=[backfill_request(lc, tags) for lc in launches])
