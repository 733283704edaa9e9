"""``scene_person_embeddings``: one CLIP vector per person detected in a scene thumbnail."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import dagster as dg
import numpy as np
from PIL import Image

from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.models import person_identity
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, BlobStore, ClipEmbedder
from heimdex_assets.resources.blob_store import BlobError
from heimdex_assets.resources.person_detector import Detection, OpenCvPersonDetector, PersonDetector, crop
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import SCENE_PERSON as STEP
from heimdex_assets.steps import Item

EMBED_CHUNK = 256  # crops preprocessed at once: bounds memory, still whole model batches
SCANS, VECTORS = STEP.table.name, STEP.extra_tables[0].name


@dataclass
class ScannedThumbnail:
    """A scene's thumbnail searched for people (crops to embed), or why it could not be."""

    item: Item
    detections: list[Detection] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)
    error: str | None = None


def scan_thumbnail(blobs: BlobStore, detector: PersonDetector, item: Item) -> ScannedThumbnail:
    """Read one thumbnail and find its people."""
    try:
        image = blobs.read_declared_image(item.payload["uri"], item.payload["declared_sha256"])
    except BlobError as exc:
        return ScannedThumbnail(item, error=str(exc))
    detections = detector.detect(image)
    return ScannedThumbnail(item, detections, [crop(image, d) for d in detections])


def embed_crops(clip: ClipEmbedder, crops: list[Image.Image]) -> np.ndarray:
    """Unit CLIP vectors of every crop of the run, a chunk at a time."""
    chunks = [clip.embed_images(crops[i : i + EMBED_CHUNK]) for i in range(0, len(crops), EMBED_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros((0, clip.dimension), dtype=np.float32)


def scan_output(t: ScannedThumbnail, vectors: np.ndarray) -> ItemOutput:
    """The scan row (the thumbnail was searched, with how many people) and one vector row per person."""
    if t.error is not None:
        return ItemOutput(error=t.error)
    scene_id = t.item.payload["scene_id"]
    people = [
        {
            "scene_id": scene_id,
            "detection_index": i,
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
    return ItemOutput(rows={SCANS: [{"scene_id": scene_id, "detections": len(people)}], VECTORS: people})


@dg.asset(
    key=STEP.asset_key,
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    kinds={"opencv", "pytorch", "postgres"},
    pool="clip",  # CLIP on the person crops: shares the GPU's pool with scene_clip_embeddings
    group_name="scene_embeddings",
    deps=["scenes"],
    description=STEP.spec.description,
)
def scene_person_embeddings(
    context: dg.AssetExecutionContext,
    db: AppDatabase,
    clip: ClipEmbedder,
    blobs: BlobStore,
    person_detector: OpenCvPersonDetector,
) -> dg.MaterializeResult:
    """Find the people in every scene thumbnail of the run and store one CLIP vector per person."""
    counts = {"detections": 0, "scenes_with_people": 0}

    def compute(batch: Batch) -> dict[str, ItemOutput]:
        # Reading, decoding and detecting overlap: OpenCV and PIL release the GIL.
        with ThreadPoolExecutor(max_workers=4) as pool:
            scanned = list(pool.map(lambda i: scan_thumbnail(blobs, person_detector, i), batch.todo))
        vectors = embed_crops(clip, [c for t in scanned for c in t.crops])
        outputs, first = {}, 0  # the crops of each thumbnail are consecutive in ``vectors``
        for t in scanned:
            outputs[t.item.item_id] = scan_output(t, vectors[first : first + len(t.crops)])
            first += len(t.crops)
            counts["detections"] += len(t.crops)
            counts["scenes_with_people"] += bool(t.crops)
        return outputs

    gate = {"clip": clip, "blobs": blobs, "person_detector": person_detector}
    run = run_step(context, db, STEP, {STEP.name: person_identity(clip, person_detector)}, compute, gate_resources=gate)
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(metadata=run.metadata(detector=person_detector.name, **counts))
