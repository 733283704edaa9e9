"""``generation_activation_sensor``: flips each step to its candidate generation once coverage and gate allow.

A run that completes a candidate flips it itself (``runs.py``); this sensor catches what no run
finishes: a candidate completed by deletions, a refusal that no longer holds (rollback, new rows, a
wider ``HEIMDEX_GATE_MARGIN``), a process that could not run the gate. Each flip and each refusal is
reported as an observation of the step's asset, with the coverage and the gate's figures as metadata:
the asset's page in the Dagster UI shows what searches read and why.
"""

import dagster as dg

from heimdex_assets.assets import DERIVED_ASSETS
from heimdex_assets.assets.scene_search import align_alias
from heimdex_assets.generations import activate_if_complete, active_generations
from heimdex_assets.models import expected_models
from heimdex_assets.resources import (
    AppDatabase,
    BlobStore,
    ClipEmbedder,
    OpenCvPersonDetector,
    SearchIndex,
    TextEmbedder,
)
from heimdex_assets.steps import STEPS


def observation(step_asset_key: str, outcome: dict) -> dg.AssetObservation:
    """The observation of one step's flip or refusal, its figures as metadata."""
    return dg.AssetObservation(
        asset_key=step_asset_key,
        metadata={
            "generation": outcome["generation"],
            "activated": outcome["activated"],
            "why_not": outcome["why_not"],
            "evaluation": dg.MetadataValue.json(outcome["evaluation"] or {}),
        },
    )


@dg.sensor(
    name="generation_activation_sensor",
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=dg.AssetSelection.assets(*DERIVED_ASSETS),
    description="Makes each step's candidate generation active once it covers every partition and passes the "
    "evaluation gate; reports each flip or refusal on the step's asset.",
)
def generation_activation_sensor(
    context: dg.SensorEvaluationContext,
    db: AppDatabase,
    text_embedder: TextEmbedder,
    clip: ClipEmbedder,
    blobs: BlobStore,
    person_detector: OpenCvPersonDetector,
    search_index: SearchIndex,
) -> dg.SensorResult:
    """One pass over the steps; cheap while a backfill is under way (it stops at the first unwritten partition)."""
    resources = {
        "text_embedder": text_embedder,
        "clip": clip,
        "blobs": blobs,
        "person_detector": person_detector,
        "search_index": search_index,
    }
    events, lines = [], []
    for step in STEPS:
        with db.transaction() as conn:
            models = expected_models(conn, resources)
            before = active_generations(conn).get(step.name)
            outcome = activate_if_complete(conn, step, models, "generation_activation_sensor", resources)
        candidate = f"{step.version} / {models[step.name]}"
        if outcome.activated is None and outcome.evaluation is None:
            continue  # already active, or not complete: nothing to report
        if outcome.why_not.endswith("(unchanged since)"):
            continue  # reported when it was refused
        if step.name == "scene_search" and outcome.activated is not None:
            align_alias(db, search_index)
        events.append(
            observation(
                step.asset_key,
                {
                    "generation": candidate,
                    "activated": outcome.activated is not None,
                    "why_not": outcome.why_not,
                    "evaluation": outcome.evaluation,
                },
            )
        )
        was = f"{before.version} / {before.model_id}" if before else "nothing"
        lines.append(
            f"{step.name}: {candidate} active (was {was})" if outcome.activated else f"{step.name}: {outcome.why_not}"
        )
    for line in lines:
        context.log.info(line)
    if not events:
        return dg.SensorResult(skip_reason=dg.SkipReason("no candidate generation is complete and not yet active"))
    return dg.SensorResult(asset_events=events, skip_reason=dg.SkipReason("; ".join(lines)))
