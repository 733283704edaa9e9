"""``scene_person_embeddings``: one CLIP vector per person detected in a scene thumbnail."""

import hashlib
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import numpy as np
from PIL import Image
from sqlalchemy import Connection, select

from heimdex_assets.assets.scene_clip import missing_input_sha256
from heimdex_assets.assets.video_runs import FORCE_TAG, OWNER_SCOPE_TAG, Scene, load_video_run, run_flag
from heimdex_assets.db.failures import FailedItem, replace_video_failures
from heimdex_assets.db.tables import scene_person_scans, scene_person_vectors
from heimdex_assets.db.vectors import replace_video_rows
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, BlobStore, ClipEmbedder
from heimdex_assets.resources.blob_store import BlobError, decode_image
from heimdex_assets.resources.person_detector import Detection, OpenCvPersonDetector, PersonDetector, crop
from heimdex_assets.spec import SPEC

STEP = SPEC.step("scene_person")
EMBED_CHUNK = 256  # crops preprocessed at once: bounds memory, still whole model batches


@dataclass
class ScannedThumbnail:
    """A scene's thumbnail searched for people (crops to embed), reused as it was, or why it failed."""

    scene: Scene
    sha256: str
    detections: list[Detection] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)
    reused: bool = False
    error: str | None = None


def scan_thumbnail(
    blobs: BlobStore, detector: PersonDetector, scene: Scene, unchanged: Callable[[Scene, str], bool]
) -> ScannedThumbnail:
    """Read one thumbnail and find its people; where ``unchanged`` says so, the last scan of these bytes stands."""
    if not scene.thumbnail_uri:
        return ScannedThumbnail(scene, missing_input_sha256(None), error="scene has no thumbnail")
    try:
        data = blobs.read(scene.thumbnail_uri)
        sha = hashlib.sha256(data).hexdigest()
        if unchanged(scene, sha):
            return ScannedThumbnail(scene, sha, reused=True)
        image = decode_image(data, scene.thumbnail_uri)
    except BlobError as exc:
        return ScannedThumbnail(scene, missing_input_sha256(scene.thumbnail_uri), error=str(exc))
    detections = detector.detect(image)
    return ScannedThumbnail(scene, sha, detections, [crop(image, d) for d in detections])


def embed_crops(clip: ClipEmbedder, crops: list[Image.Image]) -> np.ndarray:
    """Unit CLIP vectors of every crop of the run, a chunk at a time."""
    chunks = [clip.embed_images(crops[i : i + EMBED_CHUNK]) for i in range(0, len(crops), EMBED_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, clip.dimension), dtype=np.float32)


def detection_rows(t: ScannedThumbnail, vectors: np.ndarray, model_id: str) -> list[dict[str, Any]]:
    """The vector rows of a freshly scanned thumbnail, one per detection in detection order."""
    s = t.scene
    return [
        {
            "scene_id": s.id,
            "step_version": STEP.version,
            "detection_index": i,
            "video_id": s.video_id,
            "owner_id": s.owner_id,
            "model_id": model_id,
            "input_sha256": t.sha256,
            "detector": d.detector,
            "box_x": d.x,
            "box_y": d.y,
            "box_w": d.w,
            "box_h": d.h,
            "score": d.score,
            "dimension": len(vector),
            "embedding": vector,
        }
        for i, (d, vector) in enumerate(zip(t.detections, vectors, strict=True))
    ]


def scan_row(t: ScannedThumbnail, model_id: str, detections: int) -> dict[str, Any]:
    """The row saying the thumbnail was searched, and how many people it holds."""
    s = t.scene
    return {
        "scene_id": s.id,
        "step_version": STEP.version,
        "video_id": s.video_id,
        "owner_id": s.owner_id,
        "model_id": model_id,
        "input_sha256": t.sha256,
        "detections": detections,
    }


def load_previous(
    conn: Connection, video_ids: list[uuid.UUID]
) -> tuple[dict[uuid.UUID, Any], dict[uuid.UUID, list[dict[str, Any]]]]:
    """The videos' scan rows and vector rows (in detection order) at the step version, by scene."""
    scans, vectors = scene_person_scans, scene_person_vectors
    scan_of = {
        r.scene_id: r
        for r in conn.execute(
            select(scans).where(scans.c.video_id.in_(video_ids), scans.c.step_version == STEP.version)
        )
    }
    rows_of: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for r in conn.execute(
        select(vectors)
        .where(vectors.c.video_id.in_(video_ids), vectors.c.step_version == STEP.version)
        .order_by(vectors.c.scene_id, vectors.c.detection_index)
    ):
        rows_of.setdefault(r.scene_id, []).append({k: v for k, v in r._asdict().items() if k != "created_at"})
    return scan_of, rows_of


@dg.asset(
    key="scene_person_embeddings",
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"opencv", "pytorch", "postgres"},
    group_name="scene_embeddings",
    deps=["scenes"],
    description=STEP.description,
)
def scene_person_embeddings(
    context: dg.AssetExecutionContext,
    db: AppDatabase,
    clip: ClipEmbedder,
    blobs: BlobStore,
    person_detector: OpenCvPersonDetector,
) -> dg.MaterializeResult:
    """Find the people in every scene thumbnail of the run and store one CLIP vector per person."""
    started = time.monotonic()
    with db.engine.connect() as conn:
        run = load_video_run(conn, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG))
        video_ids = list(run.scenes_of)
        scan_of, previous_rows_of = load_previous(conn, video_ids)
    for why in run.skipped.values():
        context.log.info(why)
    model_id = clip.model_id
    force = run_flag(context, FORCE_TAG)

    def unchanged(scene: Scene, sha: str) -> bool:
        scan, rows = scan_of.get(scene.id), previous_rows_of.get(scene.id, [])
        return (
            not force
            and scan is not None
            and (scan.model_id, scan.input_sha256) == (model_id, sha)
            and len(rows) == scan.detections
            and all((r["model_id"], r["input_sha256"]) == (model_id, sha) for r in rows)
        )

    # Reading, decoding and detecting overlap: OpenCV and PIL release the GIL.
    with ThreadPoolExecutor(max_workers=4) as pool:
        scanned = list(pool.map(lambda s: scan_thumbnail(blobs, person_detector, s, unchanged), run.all_scenes))
    crops = [c for t in scanned for c in t.crops]
    vectors = embed_crops(clip, crops)

    vector_rows_of: dict[uuid.UUID, list[dict[str, Any]]] = {v: [] for v in video_ids}
    scan_rows_of: dict[uuid.UUID, list[dict[str, Any]]] = {v: [] for v in video_ids}
    failed_of: dict[uuid.UUID, list[FailedItem]] = {v: [] for v in video_ids}
    first = 0  # the crops of each thumbnail are consecutive in ``vectors``
    for t in scanned:
        s = t.scene
        if t.error is not None:
            failed_of[s.video_id].append(FailedItem(str(s.id), s.owner_id, s.video_id, t.sha256, t.error))
            continue
        if t.reused:
            rows = previous_rows_of.get(s.id, [])
        else:
            rows = detection_rows(t, vectors[first : first + len(t.crops)], model_id)
            first += len(t.crops)
        vector_rows_of[s.video_id] += rows
        scan_rows_of[s.video_id].append(scan_row(t, model_id, len(rows)))

    for video_id in video_ids:
        with db.transaction() as conn:  # one transaction per partition
            replace_video_rows(
                conn,
                scene_person_vectors,
                video_id,
                STEP.version,
                vector_rows_of[video_id],
                ["scene_id", "step_version", "detection_index"],
            )
            replace_video_rows(
                conn, scene_person_scans, video_id, STEP.version, scan_rows_of[video_id], ["scene_id", "step_version"]
            )
            replace_video_failures(conn, STEP.name, STEP.version, model_id, video_id, failed_of[video_id])

    failures = [f for fs in failed_of.values() for f in fs]
    for f in failures:
        context.log.warning(f"scene {f.item_id}: {f.reason}")
    run.fail_if_rejected()
    scan_rows = [r for rs in scan_rows_of.values() for r in rs]
    return dg.MaterializeResult(
        metadata={
            "videos": len(video_ids),
            "videos_skipped": dg.MetadataValue.json(run.skipped),
            "scenes": len(scanned),
            "scenes_with_people": sum(1 for r in scan_rows if r["detections"]),
            "scenes_reused": sum(1 for t in scanned if t.reused),
            "detections": sum(r["detections"] for r in scan_rows),
            "crops_embedded": len(crops),
            "failures": len(failures),
            "failure_reasons": dg.MetadataValue.json({f.item_id: f.reason for f in failures[:50]}),
            "step_version": STEP.version,
            "model_id": model_id,
            "detector": person_detector.name,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
