"""``person_photo_embeddings``: one CLIP vector per person reference photo; the photo READY or FAILED."""

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dagster as dg
from PIL import Image
from sqlalchemy import Connection, bindparam, func, or_, update

from heimdex_assets.db.tables import person_reference_photos
from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.models import person_identity
from heimdex_assets.partitions import owners_partitions
from heimdex_assets.resources import AppDatabase, BlobStore, ClipEmbedder
from heimdex_assets.resources.blob_store import BlobError
from heimdex_assets.resources.person_detector import OpenCvPersonDetector, crop
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import PERSON_PHOTO as STEP
from heimdex_assets.steps import Item

NO_PERSON = "no person found in photo"


@dataclass
class ExaminedPhoto:
    """A photo read and searched for a person: the crop's model input, or why there is none."""

    item: Item
    tensor: Any = None
    error: str | None = None


def largest_person(person_detector: OpenCvPersonDetector, image: Image.Image) -> Image.Image | None:
    """The crop of the largest detection in ``image`` (ties: higher score), or None."""
    detections = person_detector.detect(image)
    if not detections:
        return None
    return crop(image, max(detections, key=lambda d: (d.w * d.h, d.score)))


def examine_photo(
    item: Item, blobs: BlobStore, clip: ClipEmbedder, person_detector: OpenCvPersonDetector
) -> ExaminedPhoto:
    """Read, verify, decode, detect and preprocess one photo; a failure becomes a reason, not an exception."""
    try:
        image = blobs.read_declared_image(item.payload["uri"], item.payload["declared_sha256"])
    except BlobError as exc:
        return ExaminedPhoto(item, error=f"unreadable image: {exc}")
    person = largest_person(person_detector, image)
    if person is None:
        return ExaminedPhoto(item, error=NO_PERSON)
    return ExaminedPhoto(item, tensor=clip.preprocess(person))


def embed_photos(
    items: list[Item], blobs: BlobStore, clip: ClipEmbedder, person_detector: OpenCvPersonDetector
) -> dict[str, ItemOutput]:
    """The CLIP vector of the largest person in each photo, or why there is none, by item id.

    Photos go through in chunks, so memory holds a chunk's tensors, not the run's; each chunk is
    embedded in the model's batches, across owners.
    """
    outputs: dict[str, ItemOutput] = {}
    chunk = max(1, clip.batch_size) * 4
    # Reading, decoding and detection overlap: I/O, PIL and OpenCV release the GIL, and the
    # detector keeps its classifiers per thread.
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(items), chunk):
            done = list(
                pool.map(lambda i: examine_photo(i, blobs, clip, person_detector), items[start : start + chunk])
            )
            for e in done:
                if e.error is not None:
                    outputs[e.item.item_id] = ItemOutput(error=e.error)
            to_embed = [e for e in done if e.tensor is not None]
            for e, vector in zip(to_embed, clip.embed_tensors([e.tensor for e in to_embed]), strict=True):
                row = {
                    "photo_id": e.item.payload["photo_id"],
                    "person_id": e.item.payload["person_id"],
                    "dimension": len(vector),
                    "embedding": vector,
                }
                outputs[e.item.item_id] = ItemOutput(rows={STEP.table.name: [row]})
    return outputs


def set_photo_statuses(
    conn: Connection, owner_id: uuid.UUID, items: list[Item], outputs: dict[str, ItemOutput], failures: dict[str, str]
) -> None:
    """Each photo computed now: READY, or FAILED with its reason; one already so is left untouched."""
    statuses = [
        {
            "photo_id": i.payload["photo_id"],
            "new_status": "FAILED" if outputs[i.item_id].error else "READY",
            "new_reason": outputs[i.item_id].error,
        }
        for i in items
        if i.item_id in outputs
    ]
    if not statuses:
        return
    t = person_reference_photos
    stmt = (
        update(t)
        .where(
            t.c.id == bindparam("photo_id"),
            t.c.owner_id == owner_id,
            or_(
                t.c.status.is_distinct_from(bindparam("new_status")),
                t.c.failure_reason.is_distinct_from(bindparam("new_reason")),
            ),
        )
        .values(status=bindparam("new_status"), failure_reason=bindparam("new_reason"), updated_at=func.now())
    )
    conn.execute(stmt, statuses)


@dg.asset(
    key=STEP.asset_key,
    partitions_def=owners_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    kinds={"pytorch", "opencv", "postgres"},
    pool="clip",  # CLIP on the reference photos: shares the GPU's pool with scene_clip_embeddings
    group_name="person_embeddings",
    deps=["person_reference_photos"],
    description=STEP.spec.description,
)
def person_photo_embeddings(
    context: dg.AssetExecutionContext,
    db: AppDatabase,
    clip: ClipEmbedder,
    blobs: BlobStore,
    person_detector: OpenCvPersonDetector,
) -> dg.MaterializeResult:
    """One CLIP vector of the largest person in each reference photo, for every owner of the run."""

    def compute(batch: Batch) -> dict[str, ItemOutput]:
        return embed_photos(batch.todo, blobs, clip, person_detector)

    run = run_step(
        context,
        db,
        STEP,
        {STEP.name: person_identity(clip, person_detector)},
        compute,
        write_partition=set_photo_statuses,
        gate_resources={},  # its gate reads stored vectors only
    )
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(metadata=run.metadata())
