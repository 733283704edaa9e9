"""Running assets over many partitions: grouped in contiguous key ranges, never a run per video.

Used by ``heimdex demo`` and ``heimdex reprocess --sync`` (in-process, with progress). The sensor,
the ``reprocess`` job, ``heimdex reprocess`` and the admin API launch Dagster backfills instead, each
one run's worth of work: about ``scenes_per_run()`` scenes (``pack_runs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import dagster as dg
from sqlalchemy import Connection, text

from heimdex_assets.db.embedded import default_home

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# The assets' backfill policy: the most partitions Dagster puts in one run. Runs are sized by scenes
# (``pack_runs``), well below this for any video of more than one scene.
MAX_PARTITIONS_PER_RUN = 1_000
SCENES_PER_RUN_ENV = "HEIMDEX_SCENES_PER_RUN"
# About 50 typical videos of ~20 scenes: what a CPU embeds in a few minutes.
CPU_SCENES_PER_RUN = 1_000
# A GPU embeds ViT-B-32 at 2,000+ images/s: a run of 20,000 scenes takes ~10 s of model time, so its
# start-up (seconds) stops setting the pace.
GPU_SCENES_PER_RUN = 20_000
# Fresh partitions a run may carry between two stale ones (each is a quick no-op for the assets, a
# ledger row and an event), so that scattered stale videos pack into few runs.
MAX_BRIDGED_FRESH = 100


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


@cache
def scenes_per_run() -> int:
    """Scenes a run should hold: ``HEIMDEX_SCENES_PER_RUN``, else the GPU default when CUDA is there
    (only asked when CLIP may use it), else the CPU default."""
    configured = os.environ.get(SCENES_PER_RUN_ENV, "").strip()
    if configured:
        value = int(configured)
        if value < 1:
            raise ValueError(f"{SCENES_PER_RUN_ENV} must be a positive number of scenes, not {configured!r}")
        return value
    if os.environ.get("HEIMDEX_CLIP_DEVICE", "auto").strip() == "cpu":
        return CPU_SCENES_PER_RUN
    import torch  # only here: planning never needs it otherwise

    return GPU_SCENES_PER_RUN if torch.cuda.is_available() else CPU_SCENES_PER_RUN


def partition_weights(conn: Connection, partitioning: str) -> dict[str, int]:
    """The work in each partition: scenes per video, reference photos per owner (absent: none)."""
    sql = (
        "SELECT video_id, count(*) FROM scenes GROUP BY video_id"
        if partitioning == "video"
        else "SELECT owner_id, count(*) FROM person_reference_photos GROUP BY owner_id"
    )
    return {str(key): n for key, n in conn.execute(text(sql))}


def pack_runs(
    ordered: Sequence[str],
    stale: set[str],
    weights: Mapping[str, int],
    scenes_per_run: int,
    max_partitions: int | None = None,
    blocked: set[str] | frozenset[str] = frozenset(),
    max_bridged: int = MAX_BRIDGED_FRESH,
) -> list[list[str]]:
    """``stale`` keys packed into runs, each a contiguous slice of ``ordered`` (the partitions' order, as
    Dagster reads a range) that starts and ends with a stale key and takes stale partitions until it holds
    ``scenes_per_run`` scenes of stale work (its last partition may take it past: so every run but the last
    is full, and the run count is at most the work over ``scenes_per_run``, rounded up). Between two stale keys a
    run carries at most ``max_bridged`` fresh ones, never a ``blocked`` one (another run writes it); a
    run holds at most ``max_partitions`` partitions, fresh ones included."""
    runs: list[list[str]] = []
    current: list[str] = []
    gap: list[str] = []
    work = 0
    for key in ordered:
        if key in stale:
            too_big = work >= scenes_per_run
            too_long = max_partitions is not None and len(current) + len(gap) + 1 > max_partitions
            if current and (too_big or too_long or len(gap) > max_bridged):
                runs.append(current)
                current, work = [], 0
            current += [*gap, key] if current else [key]
            gap, work = [], work + max(1, weights.get(key, 0))
        elif current and key not in blocked:
            gap.append(key)
        elif current:  # a partition another run writes ends this run
            runs.append(current)
            current, gap, work = [], [], 0
    if current:
        runs.append(current)
    return runs


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
    """Materialise ``assets`` in-process, one run per range; a failed range does not stop the rest.
    Secrets read from the environment go in as ``dg.EnvVar``s, so that no run stored under
    ``DAGSTER_HOME`` holds them (``settings.deferred_secrets``)."""
    from heimdex_assets.settings import deferred_secrets  # lazily: the assets import this module

    resources = deferred_secrets(resources)
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
