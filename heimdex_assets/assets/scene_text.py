"""``scene_text_embeddings``: one text vector per scene per enabled channel."""

import time

import dagster as dg

from heimdex_assets.assets.video_runs import OWNER_SCOPE_TAG, Scene, load_video_run
from heimdex_assets.db.tables import scene_text_vectors
from heimdex_assets.db.vectors import replace_video_rows
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, TextEmbedder
from heimdex_assets.spec import SPEC
from heimdex_assets.text_cache import embed_texts_cached

STEP = SPEC.step("scene_text")


def channel_input(scene: Scene, channel: str) -> tuple[str, str] | None:
    """The text a channel embeds for ``scene`` and its source hash; None when there is nothing."""
    if channel == "transcript":
        text, sha = (scene.transcript or "").strip(), scene.transcript_sha256
    elif channel == "visual":
        description = (scene.visual_description or "").strip()
        tags = ", ".join(t.strip() for t in scene.tags if t.strip())
        text = "\n".join(part for part in (description, f"Tags: {tags}" if tags else "") if part)
        sha = scene.visual_sha256
    elif channel == "summary":
        text, sha = (scene.summary or "").strip(), scene.summary_sha256
    else:
        raise KeyError(f"unknown text channel {channel!r}")
    return (text, sha) if text and sha else None


@dg.asset(
    key="scene_text_embeddings",
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"openai", "postgres"},
    group_name="scene_embeddings",
    deps=["scenes"],
    description=STEP.description,
)
def scene_text_embeddings(
    context: dg.AssetExecutionContext, db: AppDatabase, text_embedder: TextEmbedder
) -> dg.MaterializeResult:
    """One vector per scene and enabled channel, for every video of the run, embedded in batches."""
    started = time.monotonic()
    with db.engine.connect() as conn:
        run = load_video_run(conn, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG))
    for why in run.skipped.values():
        context.log.info(why)

    items = [
        (scene, channel, *found)
        for scene in run.all_scenes
        for channel in STEP.enabled_channels
        if (found := channel_input(scene, channel))
    ]
    embedded = embed_texts_cached(db.engine, text_embedder, [text for _, _, text, _ in items])
    model_id = text_embedder.model_id
    rows_of: dict = {v: [] for v in run.scenes_of}
    for (scene, channel, _, sha), vector in zip(items, embedded.vectors, strict=True):
        rows_of[scene.video_id].append(
            {
                "scene_id": scene.id,
                "channel": channel,
                "step_version": STEP.version,
                "video_id": scene.video_id,
                "owner_id": scene.owner_id,
                "model_id": model_id,
                "input_sha256": sha,
                "dimension": int(vector.shape[0]),
                "embedding": vector,
            }
        )

    for video_id, rows in rows_of.items():
        with db.transaction() as conn:  # one transaction per partition: old state or new, never a mix
            replace_video_rows(
                conn,
                scene_text_vectors,
                video_id,
                STEP.version,
                rows,
                ["scene_id", "channel", "step_version"],
            )

    truncated = sum(embedded.truncated)
    if truncated:
        context.log.warning(f"{truncated} text input(s) exceeded the model's limit and were truncated")
    run.fail_if_rejected()
    return dg.MaterializeResult(
        metadata={
            "videos": len(run.scenes_of),
            "videos_skipped": dg.MetadataValue.json(run.skipped),
            "scenes": len(run.all_scenes),
            "vectors_written": len(items),
            "vectors_reused_from_cache": embedded.reused,
            "texts_embedded": embedded.embedded,
            "texts_truncated": truncated,
            "api_requests": embedded.requests,
            "api_retries": embedded.retries,
            "failures": 0,
            "channels": ", ".join(STEP.enabled_channels),
            "step_version": STEP.version,
            "model_id": model_id,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
