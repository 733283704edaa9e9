"""Running assets over many partitions: grouped in contiguous key ranges, never a run per video.

Used by ``heimdex demo`` and ``heimdex reprocess --sync`` (in-process, with progress); the
sensor and the admin API launch the same ranges through Dagster's backfills instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from heimdex_assets.db.embedded import default_home

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def contiguous_ranges(ordered_keys: Sequence[str], wanted: set[str], max_per_range: int) -> list[list[str]]:
    """``wanted`` keys cut into runs of consecutive keys (in the partitions' order), each at most
    ``max_per_range`` long; a key outside ``wanted`` ends the current range."""
    ranges: list[list[str]] = []
    current: list[str] = []
    for key in ordered_keys:
        if key in wanted:
            current.append(key)
            if len(current) == max_per_range:
                ranges.append(current)
                current = []
        elif current:
            ranges.append(current)
            current = []
    if current:
        ranges.append(current)
    return ranges


def dagster_instance() -> dg.DagsterInstance:
    """The instance of ``DAGSTER_HOME`` (default: ``dagster/`` under the Heimdex home), created on first use."""
    home = Path(os.environ.get("DAGSTER_HOME") or default_home() / "dagster").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():  # local storage under the home; no telemetry
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


@dataclass
class RangeOutcome:
    """One run over one key range."""

    keys: list[str]
    success: bool
    run_id: str
    metadata: dict[str, dict[str, object]]
    error: str | None = None


def materialize_ranges(
    assets: list[dg.AssetsDefinition],
    ranges: list[list[str]],
    resources: dict[str, object],
    instance: dg.DagsterInstance,
    tags: dict[str, str] | None = None,
    on_range_done: Callable[[RangeOutcome], None] | None = None,
    log_level: str = "WARNING",
) -> list[RangeOutcome]:
    """Materialise ``assets`` in-process, one run per range; a failed range does not stop the rest."""
    outcomes = []
    for keys in ranges:
        run_tags = dict(tags or {})
        if len(keys) > 1:
            run_tags |= {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}
        result = dg.materialize(
            assets,
            partition_key=keys[0] if len(keys) == 1 else None,
            resources=resources,
            instance=instance,
            tags=run_tags,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
        metadata = {
            mat.asset_key.to_user_string(): {k: v.value for k, v in mat.metadata.items()}
            for mat in result.get_asset_materialization_events()
            for mat in [mat.event_specific_data.materialization]
        }
        error = None
        if not result.success:
            failures = result.get_step_failure_events()
            error = failures[0].event_specific_data.error.message.strip().splitlines()[0] if failures else "failed"
        outcome = RangeOutcome(keys, result.success, result.run_id, metadata, error or "run failed")
        outcomes.append(outcome)
        if on_range_done:
            on_range_done(outcome)
    return outcomes
