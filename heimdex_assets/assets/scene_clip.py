"""``scene_clip_embeddings``: one CLIP image vector per scene thumbnail."""

from dataclasses import dataclass
from typing import Any

import dagster as dg

from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.pipelining import prefetch_map
from heimdex_assets.resources import AppDatabase, BlobStore, ClipEmbedder
from heimdex_assets.resources.blob_store import BlobError
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import SCENE_CLIP as STEP
from heimdex_assets.steps import Item


@dataclass
class LoadedThumbnail:
    """A scene's thumbnail ready for the model, or the reason it is not."""

    item: Item
    tensor: Any = None
    error: str | None = None


def decode_size(clip: ClipEmbedder) -> tuple[int, int] | None:
    """The smallest decoded size worth having: twice the model's input side, as ``Image.thumbnail`` keeps
    before its antialiased resize (a 1080p JPEG decodes at half scale for a 224 px model)."""
    size = clip.input_size
    return (2 * size[0], 2 * size[1]) if size is not None else None


def load_thumbnail(
    blobs: BlobStore, clip: ClipEmbedder, item: Item, at_least: tuple[int, int] | None = None
) -> LoadedThumbnail:
    """Read, verify, decode and preprocess one thumbnail; a failure becomes a reason, not an exception."""
    try:
        image = blobs.read_declared_image(item.payload["uri"], item.payload["declared_sha256"], at_least)
        return LoadedThumbnail(item, tensor=clip.preprocess(image))
    except BlobError as exc:
        return LoadedThumbnail(item, error=str(exc))


def embed_thumbnails(blobs: BlobStore, clip: ClipEmbedder, items: list[Item]) -> dict[str, ItemOutput]:
    """``clip.workers`` threads read and decode the next thumbnails while the model embeds a full batch;
    at most two batches of images are held at a time, however many scenes the run has."""
    outputs: dict[str, ItemOutput] = {}
    batch: list[LoadedThumbnail] = []
    at_least = decode_size(clip) if items else None

    def embed_batch() -> None:
        for t, vector in zip(batch, clip.embed_tensors([t.tensor for t in batch]), strict=True):
            row = {"scene_id": t.item.payload["scene_id"], "dimension": len(vector), "embedding": vector}
            outputs[t.item.item_id] = ItemOutput(rows={STEP.table.name: [row]})
        batch.clear()

    def load(item: Item) -> LoadedThumbnail:
        return load_thumbnail(blobs, clip, item, at_least)

    for t in prefetch_map(load, items, workers=clip.workers, window=2 * clip.batch_size):
        if t.error is not None:
            outputs[t.item.item_id] = ItemOutput(error=t.error)
            continue
        batch.append(t)
        if len(batch) == clip.batch_size:
            embed_batch()
    if batch:
        embed_batch()
    return outputs


@dg.asset(
    key=STEP.asset_key,
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    kinds={"pytorch", "postgres"},
    pool="clip",  # one CLIP step per GPU across runs (README "Run limits and retries")
    group_name="scene_embeddings",
    deps=["scenes"],
    description=STEP.spec.description,
)
def scene_clip_embeddings(
    context: dg.AssetExecutionContext, db: AppDatabase, clip: ClipEmbedder, blobs: BlobStore
) -> dg.MaterializeResult:
    """One CLIP image vector per scene thumbnail, for every video in the run."""

    def compute(batch: Batch) -> dict[str, ItemOutput]:
        return embed_thumbnails(blobs, clip, batch.todo)

    run = run_step(
        context, db, STEP, {STEP.name: clip.model_id}, compute, gate_resources={"clip": clip, "blobs": blobs}
    )
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(metadata=run.metadata())
