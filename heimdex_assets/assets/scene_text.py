"""``scene_text_embeddings``: one text vector per scene per enabled channel."""

import dagster as dg

from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, TextEmbedder
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import SCENE_TEXT as STEP
from heimdex_assets.text_cache import embed_texts_cached


@dg.asset(
    key=STEP.asset_key,
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    kinds={"openai", "postgres"},
    pool="openai",  # one embeddings caller per API key across runs: the key's token rate is the limit
    # The client retries transient errors; this covers OpenAI down for longer (an outage): retries at ~10 s, ~30 s
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS),
    group_name="scene_embeddings",
    deps=["scenes"],
    description=STEP.spec.description,
)
def scene_text_embeddings(
    context: dg.AssetExecutionContext, db: AppDatabase, text_embedder: TextEmbedder
) -> dg.MaterializeResult:
    """One vector per scene and enabled channel, for every video of the run, embedded in batches."""
    stats: dict[str, int] = {}

    def compute(batch: Batch) -> dict[str, ItemOutput]:
        embedded = embed_texts_cached(db.engine, text_embedder, [i.payload["text"] for i in batch.todo])
        stats.update(
            reused_from_cache=embedded.reused,
            texts_embedded=embedded.embedded,
            texts_truncated=sum(embedded.truncated),
            api_requests=embedded.requests,
            api_retries=embedded.retries,
        )
        outputs: dict[str, ItemOutput] = {}
        for n, (i, vector) in enumerate(zip(batch.todo, embedded.vectors, strict=True)):
            if n in embedded.failed:  # its request failed for good: this item alone fails, the others go on
                outputs[i.item_id] = ItemOutput(error=embedded.failed[n])
                continue
            row = {
                "scene_id": i.payload["scene_id"],
                "channel": i.payload["channel"],
                "dimension": int(vector.shape[0]),
                "embedding": vector,
            }
            outputs[i.item_id] = ItemOutput(rows={STEP.table.name: [row]})
        return outputs

    run = run_step(
        context, db, STEP, {STEP.name: text_embedder.model_id}, compute, gate_resources={"text_embedder": text_embedder}
    )
    if stats.get("texts_truncated"):
        context.log.warning(f"{stats['texts_truncated']} text input(s) exceeded the model's limit and were truncated")
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(metadata=run.metadata(channels=", ".join(STEP.spec.enabled_channels), **stats))
