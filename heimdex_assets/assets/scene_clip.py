"""``scene_clip_embeddings``: one CLIP image vector per scene thumbnail."""

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
from sqlalchemy import select

from heimdex_assets.assets.video_runs import FORCE_TAG, OWNER_SCOPE_TAG, Scene, load_video_run, run_flag
from heimdex_assets.db.failures import FailedItem, replace_video_failures
from heimdex_assets.db.tables import scene_clip_vectors
from heimdex_assets.db.vectors import replace_video_rows
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.pipelining import prefetch_map
from heimdex_assets.resources import AppDatabase, BlobStore, ClipEmbedder
from heimdex_assets.resources.blob_store import BlobError
from heimdex_assets.spec import SPEC

STEP = SPEC.step("scene_clip")


def missing_input_sha256(uri: str | None) -> str:
    """The input hash recorded for a thumbnail that could not be read (changes when its URI does)."""
    return hashlib.sha256(f"unreadable:{uri or ''}".encode()).hexdigest()


@dataclass
class LoadedThumbnail:
    """A scene's thumbnail ready for the model, or the reason it is not."""

    scene: Scene
    sha256: str
    tensor: Any = None
    error: str | None = None


def load_thumbnail(blobs: BlobStore, clip: ClipEmbedder, scene: Scene) -> LoadedThumbnail:
    """Read, decode and preprocess one thumbnail; a failure becomes a reason, not an exception."""
    if not scene.thumbnail_uri:
        return LoadedThumbnail(scene, missing_input_sha256(None), error="scene has no thumbnail")
    try:
        image, data = blobs.read_image(scene.thumbnail_uri)
        return LoadedThumbnail(scene, hashlib.sha256(data).hexdigest(), tensor=clip.preprocess(image))
    except BlobError as exc:
        return LoadedThumbnail(scene, missing_input_sha256(scene.thumbnail_uri), error=str(exc))


@dg.asset(
    key="scene_clip_embeddings",
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"pytorch", "postgres"},
    group_name="scene_embeddings",
    deps=["scenes"],
    description=STEP.description,
)
def scene_clip_embeddings(
    context: dg.AssetExecutionContext, db: AppDatabase, clip: ClipEmbedder, blobs: BlobStore
) -> dg.MaterializeResult:
    """One CLIP image vector per scene thumbnail, for every video in the run."""
    started = time.monotonic()
    with db.engine.connect() as conn:
        run = load_video_run(conn, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG))
        existing = {
            (r.scene_id): r
            for r in conn.execute(
                select(scene_clip_vectors).where(
                    scene_clip_vectors.c.video_id.in_(list(run.scenes_of)),
                    scene_clip_vectors.c.step_version == STEP.version,
                )
            )
        }
    for why in run.skipped.values():
        context.log.info(why)
    model_id = clip.model_id
    force = run_flag(context, FORCE_TAG)

    def unchanged(t: LoadedThumbnail) -> bool:
        row = existing.get(t.scene.id)
        return not force and row is not None and row.model_id == model_id and row.input_sha256 == t.sha256

    # Threads read and decode the next thumbnails while the model embeds a full batch; at most two
    # batches of images are held at a time, however many scenes the run has.
    loaded: list[LoadedThumbnail] = []
    batch: list[LoadedThumbnail] = []
    vectors: dict[uuid.UUID, np.ndarray] = {}

    def embed_batch() -> None:
        for t, vector in zip(batch, clip.embed_tensors([t.tensor for t in batch]), strict=True):
            vectors[t.scene.id] = vector
            t.tensor = None
        batch.clear()

    thumbnails = prefetch_map(lambda s: load_thumbnail(blobs, clip, s), run.all_scenes, window=2 * clip.batch_size)
    for t in thumbnails:
        loaded.append(t)
        if t.error is None and not unchanged(t):
            batch.append(t)
            if len(batch) == clip.batch_size:
                embed_batch()
        else:
            t.tensor = None
    if batch:
        embed_batch()

    rows_of: dict[uuid.UUID, list[dict]] = {v: [] for v in run.scenes_of}
    failed_of: dict[uuid.UUID, list[FailedItem]] = {v: [] for v in run.scenes_of}
    for t in loaded:
        s = t.scene
        if t.error is not None:
            failed_of[s.video_id].append(FailedItem(str(s.id), s.owner_id, s.video_id, t.sha256, t.error))
            continue
        vector = vectors[s.id] if s.id in vectors else existing[s.id].embedding
        rows_of[s.video_id].append(
            {
                "scene_id": s.id,
                "step_version": STEP.version,
                "video_id": s.video_id,
                "owner_id": s.owner_id,
                "model_id": model_id,
                "input_sha256": t.sha256,
                "dimension": len(vector),
                "embedding": vector,
            }
        )

    for video_id in run.scenes_of:
        with db.transaction() as conn:  # one transaction per partition
            replace_video_rows(
                conn,
                scene_clip_vectors,
                video_id,
                STEP.version,
                rows_of[video_id],
                ["scene_id", "step_version"],
            )
            replace_video_failures(conn, STEP.name, STEP.version, model_id, video_id, failed_of[video_id])

    failures = [f for fs in failed_of.values() for f in fs]
    for f in failures:
        context.log.warning(f"scene {f.item_id}: {f.reason}")
    run.fail_if_rejected()
    return dg.MaterializeResult(
        metadata={
            "videos": len(run.scenes_of),
            "videos_skipped": dg.MetadataValue.json(run.skipped),
            "scenes": len(loaded),
            "vectors_written": sum(len(r) for r in rows_of.values()),
            "vectors_embedded": len(vectors),
            "vectors_unchanged": len(loaded) - len(vectors) - len(failures),
            "failures": len(failures),
            "failure_reasons": dg.MetadataValue.json({f.item_id: f.reason for f in failures[:50]}),
            "step_version": STEP.version,
            "model_id": model_id,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
