"""Housekeeping on a schedule: old generations are pruned daily, past their grace period."""

import dagster as dg

from heimdex_assets.generations import PRUNE_GRACE, prune
from heimdex_assets.models import expected_models, model_resources
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector, SearchIndex, TextEmbedder


@dg.op(description="Delete the rows and indexes of generations older than the previous one, past the grace period.")
def prune_generations_op(
    context: dg.OpExecutionContext,
    db: AppDatabase,
    search_index: SearchIndex,
    text_embedder: TextEmbedder,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
) -> None:
    resources = model_resources(text_embedder, clip, person_detector, search_index)
    with db.engine.connect() as conn:
        models = expected_models(conn, resources)
    report = prune(db, search_index, models, PRUNE_GRACE)
    for entry in report:
        context.log.info(f"pruned {entry}")
    context.log.info(f"{len(report)} generation(s) pruned")


@dg.job(description="Prune generations that no search reads and no run writes any more.")
def prune_generations_job() -> None:
    prune_generations_op()


prune_generations_schedule = dg.ScheduleDefinition(
    name="prune_generations_daily",
    job=prune_generations_job,
    cron_schedule="30 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 03:30: prune generations past the grace period (never the active or previous one).",
)
