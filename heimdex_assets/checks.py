"""Per-partition freshness as partitioned asset checks: the Dagster UI shows, in bulk, which partitions of
each derived asset are fresh and which are stale, missing or failed.

Each derived asset ``A`` has a companion ``freshness/A`` (an external asset, never materialised, same
partitions, downstream of ``A``) carrying one partitioned check, ``fresh``. ``freshness_checks_sensor``
records the per-partition results that changed through one small run a tick (Dagster refuses a second
run-less result for the same partition); a run of the check (the UI's "Execute") evaluates the partitions
it is given the same way.

Why a companion and not a check on ``A`` itself: Dagster shows a partition's check result only while it
targets that partition's latest materialisation, and a result recorded without a run can name its target
only through a class outside Dagster's public API. Every materialisation of ``A`` would blank the check
of its partitions. The companion is never materialised, so what the sensor records stays visible.
"""

import uuid
import warnings

import dagster as dg

from heimdex_assets.freshness import PartitionState, partition_states
from heimdex_assets.models import expected_models, model_resources
from heimdex_assets.partitions import owners_partitions, videos_partitions
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.steps import STEPS, Step

CHECK_NAME = "fresh"
PARTITIONINGS = {"video": videos_partitions, "owner": owners_partitions}
# A partition that needs a run (stale, missing) fails as an error; one that only waits for its failure
# backoff fails as a warning.
SEVERITY = {"stale": dg.AssetCheckSeverity.ERROR, "missing": dg.AssetCheckSeverity.ERROR}


def freshness_key(asset_key: str) -> dg.AssetKey:
    """The companion asset whose ``fresh`` check holds ``asset_key``'s per-partition freshness."""
    return dg.AssetKey(["freshness", asset_key])


def check_key(asset_key: str) -> dg.AssetCheckKey:
    """The key of ``asset_key``'s freshness check."""
    return dg.AssetCheckKey(freshness_key(asset_key), CHECK_NAME)


def evaluation(asset_key: str, state: PartitionState) -> dg.AssetCheckEvaluation:
    """The check result of one partition: passed when fresh; its state, item counts and next retry as metadata."""
    return dg.AssetCheckEvaluation(
        asset_key=freshness_key(asset_key),
        check_name=CHECK_NAME,
        passed=state.state == "fresh",
        partition=state.key,
        severity=SEVERITY.get(state.state, dg.AssetCheckSeverity.WARN),
        description=f"{asset_key} partition is {state.state}",
        metadata={
            "state": state.state,
            "items": state.items,
            "stale_items": state.stale_items,
            "failed_items": state.failed_items,
            "retry_at": state.retry_at.isoformat() if state.retry_at else "",
        },
    )


def _freshness_spec(step: Step) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=freshness_key(step.asset_key),
        deps=[step.asset_key],
        partitions_def=PARTITIONINGS[step.partitioning],
        group_name="freshness",
        kinds={"postgres"},
        description=f"Per-partition freshness of {step.asset_key}, as its `{CHECK_NAME}` check; never materialised. "
        f"The check's failed partitions are those to redo (stale, missing) or waiting for a failure backoff.",
    )


def _freshness_check(step: Step) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=freshness_key(step.asset_key),
        name=CHECK_NAME,
        partitions_def=PARTITIONINGS[step.partitioning],
        description=f"Passes for the partitions of {step.asset_key} that are fresh; fails for stale, missing "
        "(error) and failed ones (warning). Recorded by freshness_checks_sensor without a run.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext,
        db: AppDatabase,
        text_embedder: TextEmbedder,
        clip: ClipEmbedder,
        person_detector: OpenCvPersonDetector,
        search_index: SearchIndex,
    ) -> dg.AssetCheckResult:
        key = context.partition_key
        resources = model_resources(text_embedder, clip, person_detector, search_index)
        with db.engine.connect() as conn:
            states = partition_states(conn, step, expected_models(conn, resources), partition_ids=[uuid.UUID(key)])
        if key not in states:
            what = "READY video" if step.partitioning == "video" else "owner"
            return dg.AssetCheckResult(passed=True, description=f"not a {what}: nothing to embed")
        e = evaluation(step.asset_key, states[key])
        return dg.AssetCheckResult(passed=e.passed, severity=e.severity, description=e.description, metadata=e.metadata)

    return _check


FRESHNESS_SPECS = [_freshness_spec(step) for step in STEPS]
with warnings.catch_warnings():  # partitioned checks are a preview feature of Dagster 1.13: said once, here
    warnings.simplefilter("ignore", dg.PreviewWarning)
    FRESHNESS_CHECKS = [_freshness_check(step) for step in STEPS]
