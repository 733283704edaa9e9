"""``person_photo_embeddings``: one CLIP vector per person reference photo; the photo READY or FAILED."""

import hashlib
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
from PIL import Image
from sqlalchemy import Connection, bindparam, func, or_, select, update

from heimdex_assets.assets.owner_runs import load_owner_run
from heimdex_assets.assets.scene_clip import missing_input_sha256
from heimdex_assets.assets.video_runs import FORCE_TAG, OWNER_SCOPE_TAG, run_flag
from heimdex_assets.db.failures import FailedItem, clear_failures, record_failures
from heimdex_assets.db.tables import embedding_failures, person_photo_vectors, person_reference_photos
from heimdex_assets.db.vectors import replace_owner_rows
from heimdex_assets.partitions import owners_partitions
from heimdex_assets.resources import AppDatabase, BlobStore, ClipEmbedder
from heimdex_assets.resources.blob_store import BlobError, decode_image
from heimdex_assets.resources.person_detector import OpenCvPersonDetector, crop
from heimdex_assets.spec import SPEC

STEP = SPEC.step("person_photo")
NO_PERSON = "no person found in photo"


@dataclass(frozen=True)
class Photo:
    """A person reference photo as the product stored it."""

    id: uuid.UUID
    person_id: uuid.UUID
    owner_id: uuid.UUID
    uri: str


@dataclass
class ExaminedPhoto:
    """A photo read and searched for a person: the crop's model input, or why there is none."""

    photo: Photo
    sha256: str
    tensor: Any = None
    error: str | None = None
    unchanged: bool = False


def largest_person(person_detector: OpenCvPersonDetector, image: Image.Image) -> Image.Image | None:
    """The crop of the largest detection in ``image`` (ties: higher score), or None."""
    detections = person_detector.detect(image)
    if not detections:
        return None
    return crop(image, max(detections, key=lambda d: (d.w * d.h, d.score)))


def examine_photo(
    photo: Photo,
    blobs: BlobStore,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
    unchanged: Callable[[Photo, str], bool],
) -> ExaminedPhoto:
    """Read, hash, decode, detect and preprocess one photo; a failure becomes a reason, not an exception.

    ``unchanged(photo, sha256)`` says whether the stored vector already fits these bytes: then the
    detector and the model are skipped.
    """
    try:
        data = blobs.read(photo.uri)
    except BlobError as exc:
        return ExaminedPhoto(photo, missing_input_sha256(photo.uri), error=f"unreadable image: {exc}")
    sha = hashlib.sha256(data).hexdigest()
    if unchanged(photo, sha):
        return ExaminedPhoto(photo, sha, unchanged=True)
    try:
        image = decode_image(data, photo.uri)
    except BlobError as exc:
        return ExaminedPhoto(photo, sha, error=f"unreadable image: {exc}")
    person = largest_person(person_detector, image)
    if person is None:
        return ExaminedPhoto(photo, sha, error=NO_PERSON)
    return ExaminedPhoto(photo, sha, tensor=clip.preprocess(person))


def embed_photos(
    photos: list[Photo],
    blobs: BlobStore,
    clip: ClipEmbedder,
    person_detector: OpenCvPersonDetector,
    unchanged: Callable[[Photo, str], bool],
) -> tuple[list[ExaminedPhoto], dict[uuid.UUID, np.ndarray]]:
    """Every photo examined, and the new CLIP vectors of those that show a person, by photo id.

    Photos go through in chunks, so memory holds a chunk's bytes and tensors, not the run's;
    each chunk is embedded in the model's batches, across owners.
    """
    examined: list[ExaminedPhoto] = []
    vectors: dict[uuid.UUID, np.ndarray] = {}
    chunk = max(1, clip.batch_size) * 4

    def examine(photo: Photo) -> ExaminedPhoto:
        return examine_photo(photo, blobs, clip, person_detector, unchanged)

    # Reading, decoding and detection overlap with each other: I/O, PIL and OpenCV release the GIL,
    # and the detector keeps its classifiers per thread.
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(photos), chunk):
            done = list(pool.map(examine, photos[start : start + chunk]))
            to_embed = [e for e in done if e.tensor is not None]
            embedded = clip.embed_tensors([e.tensor for e in to_embed])
            for e, vector in zip(to_embed, embedded, strict=True):
                vectors[e.photo.id] = vector
                e.tensor = None  # the vector is what is kept
            examined += done
    return examined, vectors


def set_photo_statuses(conn: Connection, owner_id: uuid.UUID, statuses: list[dict[str, Any]]) -> None:
    """Set each photo's status and failure reason; a photo already so is left untouched (updated_at kept)."""
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
    key="person_photo_embeddings",
    partitions_def=owners_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"pytorch", "opencv", "postgres"},
    group_name="person_embeddings",
    deps=["person_reference_photos"],
    description=STEP.description,
)
def person_photo_embeddings(
    context: dg.AssetExecutionContext,
    db: AppDatabase,
    clip: ClipEmbedder,
    blobs: BlobStore,
    person_detector: OpenCvPersonDetector,
) -> dg.MaterializeResult:
    """One CLIP vector of the largest person in each reference photo, for every owner of the run."""
    started = time.monotonic()
    with db.engine.connect() as conn:
        run = load_owner_run(conn, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG))
        t = person_reference_photos
        photos = [
            Photo(r.id, r.person_id, r.owner_id, r.uri)
            for r in conn.execute(
                select(t.c.id, t.c.person_id, t.c.owner_id, t.c.uri)
                .where(t.c.owner_id.in_(run.owner_ids))
                .order_by(t.c.owner_id, t.c.person_id, t.c.id)
            )
        ]
        existing = {
            r.photo_id: r
            for r in conn.execute(
                select(person_photo_vectors).where(
                    person_photo_vectors.c.owner_id.in_(run.owner_ids),
                    person_photo_vectors.c.step_version == STEP.version,
                )
            )
        }
    model_id = clip.model_id
    force = run_flag(context, FORCE_TAG)

    def unchanged(photo: Photo, sha: str) -> bool:
        row = existing.get(photo.id)
        return not force and row is not None and row.model_id == model_id and row.input_sha256 == sha

    examined, vectors = embed_photos(photos, blobs, clip, person_detector, unchanged)
    failures = [e for e in examined if e.error is not None]
    for owner_id in run.owner_ids:
        rows, statuses, failed = [], [], []
        for e in examined:
            if e.photo.owner_id != owner_id:
                continue
            statuses.append(
                {"photo_id": e.photo.id, "new_status": "FAILED" if e.error else "READY", "new_reason": e.error}
            )
            if e.error is not None:
                failed.append(FailedItem(str(e.photo.id), owner_id, None, e.sha256, e.error))
                continue
            vector = vectors[e.photo.id] if e.photo.id in vectors else existing[e.photo.id].embedding
            rows.append(
                {
                    "photo_id": e.photo.id,
                    "step_version": STEP.version,
                    "person_id": e.photo.person_id,
                    "owner_id": owner_id,
                    "model_id": model_id,
                    "input_sha256": e.sha256,
                    "dimension": len(vector),
                    "embedding": vector,
                }
            )
        with db.transaction() as conn:  # one transaction per partition: old state or new, never a mix
            replace_owner_rows(conn, person_photo_vectors, owner_id, STEP.version, rows, ["photo_id", "step_version"])
            set_photo_statuses(conn, owner_id, statuses)
            record_failures(conn, STEP.name, STEP.version, model_id, failed)
            recorded = conn.execute(
                select(embedding_failures.c.item_id).where(
                    embedding_failures.c.step == STEP.name,
                    embedding_failures.c.step_version == STEP.version,
                    embedding_failures.c.owner_id == owner_id,
                )
            ).scalars()
            # Photos that now succeed, or no longer exist, lose their failure record.
            clear_failures(conn, STEP.name, STEP.version, set(recorded) - {f.item_id for f in failed})

    for e in failures:
        context.log.warning(f"photo {e.photo.id} of person {e.photo.person_id}: {e.error}")
    run.fail_if_rejected()
    return dg.MaterializeResult(
        metadata={
            "owners": len(run.owner_ids),
            "photos": len(examined),
            "ready": len(examined) - len(failures),
            "failed": len(failures),
            "failure_reasons": dg.MetadataValue.json({str(e.photo.id): e.error for e in failures[:50]}),
            "vectors_embedded": len(vectors),
            "vectors_unchanged": sum(e.unchanged for e in examined),
            "step_version": STEP.version,
            "model_id": model_id,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
