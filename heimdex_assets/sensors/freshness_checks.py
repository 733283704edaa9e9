"""``freshness_checks_sensor``: records each partition's freshness as the result of its asset's ``fresh`` check.

Every tick computes every partition's state from ``freshness.py`` (one query per step) and has the check
results of the partitions whose state changed since the last tick recorded by one small run of
``record_freshness_checks`` (no model, no resource: it logs the results it is given). Not without a run:
Dagster 1.13.27 stores a result recorded without a run under the run id "", and its unique index on
(check, run id, partition) refuses a second such result for the same partition. The cursor keeps, per
asset, a short hash of each of ``BUCKETS`` buckets of (partition, state) pairs: a few kilobytes whatever the
partition count. A changed bucket has all its partitions recorded again (about partitions / ``BUCKETS``
each); an unchanged one nothing. At most ``MAX_EVALUATIONS_PER_TICK`` results a tick: the buckets left over
keep their old hash and are recorded on the next ticks.
"""

import base64
import hashlib
import json
import zlib
from collections import defaultdict
from datetime import datetime

import dagster as dg

from heimdex_assets.checks import PARTITIONINGS, evaluation
from heimdex_assets.freshness import PartitionState, partition_states
from heimdex_assets.models import expected_models, model_resources
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector, SearchIndex, TextEmbedder
from heimdex_assets.steps import STEPS

BUCKETS = 1024
MAX_EVALUATIONS_PER_TICK = 5000


def bucket_of(partition_key: str) -> int:
    """The cursor bucket of a partition key: stable across processes (not Python's salted ``hash``)."""
    return zlib.crc32(partition_key.encode()) % BUCKETS


def bucket_hashes(states: dict[str, PartitionState]) -> dict[int, str]:
    """Per non-empty bucket, an 8-hex-digit digest of its sorted (partition, state) pairs."""
    pairs: dict[int, list[str]] = defaultdict(list)
    for key, state in states.items():
        pairs[bucket_of(key)].append(f"{key}={state.state}")
    return {b: hashlib.blake2b("\n".join(sorted(p)).encode(), digest_size=4).hexdigest() for b, p in pairs.items()}


def read_cursor(cursor: str | None) -> dict[str, dict[int, str]]:
    """Per asset, the bucket hashes recorded so far (none for an empty cursor)."""
    if not cursor:
        return {}
    raw = json.loads(zlib.decompress(base64.b64decode(cursor)))
    return {asset: {int(b): h for b, h in buckets.items()} for asset, buckets in raw.items()}


def write_cursor(recorded: dict[str, dict[int, str]]) -> str:
    """The cursor holding ``recorded``, compressed."""
    raw = json.dumps(
        {a: {str(b): h for b, h in sorted(bs.items())} for a, bs in recorded.items()}, separators=(",", ":")
    )
    return base64.b64encode(zlib.compress(raw.encode(), 9)).decode()


def changed_evaluations(
    states_by_asset: dict[str, dict[str, PartitionState]],
    recorded: dict[str, dict[int, str]],
    max_evaluations: int = MAX_EVALUATIONS_PER_TICK,
) -> tuple[list[dg.AssetCheckEvaluation], dict[str, dict[int, str]], int]:
    """The check results to record now (every partition of each changed bucket, whole buckets, at most
    ``max_evaluations`` unless one bucket alone is larger), the cursor after them, and how many results
    wait for a later tick."""
    events: list[dg.AssetCheckEvaluation] = []
    after = {asset: dict(buckets) for asset, buckets in recorded.items()}
    left = 0
    for asset_key, states in states_by_asset.items():
        now = bucket_hashes(states)
        before = recorded.get(asset_key, {})
        by_bucket: dict[int, list[PartitionState]] = defaultdict(list)
        for state in states.values():
            by_bucket[bucket_of(state.key)].append(state)
        mine = after.setdefault(asset_key, {})
        for b in sorted(set(now) | set(before)):
            if now.get(b) == before.get(b):
                continue
            batch = by_bucket.get(b, [])
            if events and len(events) + len(batch) > max_evaluations:
                left += len(batch)
                continue
            events += [evaluation(asset_key, s) for s in sorted(batch, key=lambda s: s.key)]
            if b in now:
                mine[b] = now[b]
            else:  # its partitions were all deleted: their results go with the partitions
                mine.pop(b, None)
    return events, after, left


class FreshnessResults(dg.Config):
    """The check results to record, as ``evaluations_to_json`` wrote them."""

    results: str


def evaluations_to_json(events: list[dg.AssetCheckEvaluation]) -> str:
    """The results as compact JSON: asset, partition, state and counts (run config, so kept small)."""
    rows = []
    for e in events:
        m = {k: v.value for k, v in e.metadata.items()}
        rows.append(
            [
                e.asset_key.path[-1],
                e.partition,
                m["state"],
                m["items"],
                m["stale_items"],
                m["failed_items"],
                m["retry_at"],
            ]
        )
    return json.dumps(rows, separators=(",", ":"))


@dg.op(name="record_freshness_checks", description="Logs the freshness check results the sensor computed.")
def record_freshness_checks(context: dg.OpExecutionContext, config: FreshnessResults) -> None:
    for asset_key, key, state, items, stale, failed, retry_at in json.loads(config.results):
        retry = datetime.fromisoformat(retry_at) if retry_at else None
        context.log_event(evaluation(asset_key, PartitionState(key, state, items, stale, failed, 0, retry)))


@dg.job(name="record_freshness_checks_job", description="Run by freshness_checks_sensor; records check results.")
def record_freshness_checks_job() -> None:
    record_freshness_checks()


@dg.sensor(
    name="freshness_checks_sensor",
    job=record_freshness_checks_job,
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records each partition's freshness (fresh, stale, missing, failed) as the `fresh` check of "
    "freshness/<asset>, through one small run a tick; only the partitions whose state changed since the last tick.",
)
def freshness_checks_sensor(
    context: dg.SensorEvaluationContext,
    db: AppDatabase,
    text_embedder: TextEmbedder,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
    search_index: SearchIndex,
) -> dg.SensorResult:
    """One run recording the check results of the registered partitions whose state changed, 5,000 at most."""
    resources = model_resources(text_embedder, clip, person_detector, search_index)
    registered = {kind: set(context.instance.get_dynamic_partitions(p.name)) for kind, p in PARTITIONINGS.items()}
    states_by_asset = {}
    with db.engine.connect() as conn:
        models = expected_models(conn, resources)
        for step in STEPS:
            known = registered[step.partitioning]
            states = partition_states(conn, step, models)
            # Only registered keys: a check result for a key the partitions do not hold is not shown.
            states_by_asset[step.asset_key] = {k: s for k, s in states.items() if k in known}
    events, recorded, left = changed_evaluations(states_by_asset, read_cursor(context.cursor))
    cursor = write_cursor(recorded)
    if not events:
        return dg.SensorResult(skip_reason=dg.SkipReason("no partition changed state"), cursor=cursor)
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        counts[e.metadata["state"].value] += 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    context.log.info(f"{len(events)} partition check results to record ({summary}); {left} left for later ticks")
    results = evaluations_to_json(events)
    request = dg.RunRequest(
        run_config=dg.RunConfig(ops={"record_freshness_checks": FreshnessResults(results=results)}),
        tags={"heimdex/freshness_results": str(len(events))},
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)
