"""``person_query_embeddings``: per person, the L2-normalised mean of its READY photo vectors."""

import uuid
from collections.abc import Sequence

import dagster as dg
import numpy as np
from sqlalchemy import select

from heimdex_assets.assets.person_photo import person_photo_embeddings
from heimdex_assets.db.tables import person_photo_vectors
from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.models import person_identity
from heimdex_assets.partitions import owners_partitions
from heimdex_assets.resources import AppDatabase, ClipEmbedder, OpenCvPersonDetector
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import PERSON_PHOTO
from heimdex_assets.steps import PERSON_QUERY as STEP


def mean_unit_vector(vectors: Sequence[np.ndarray]) -> np.ndarray | None:
    """The L2-normalised mean of ``vectors`` (in float64), or None when the mean is zero."""
    mean = np.mean(np.asarray(vectors, dtype=np.float64), axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 0 else None


@dg.asset(
    key=STEP.asset_key,
    partitions_def=owners_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    kinds={"postgres"},
    group_name="person_embeddings",
    deps=[person_photo_embeddings],
    description=STEP.spec.description,
)
def person_query_embeddings(
    context: dg.AssetExecutionContext, db: AppDatabase, clip: ClipEmbedder, person_detector: OpenCvPersonDetector
) -> dg.MaterializeResult:
    """One query vector per person of every owner in the run, from the current photo vectors."""
    # The vectors averaged are person_photo's, so they share its model identity (no model is loaded).
    model_id = person_identity(clip, person_detector)

    def compute(batch: Batch) -> dict[str, ItemOutput]:
        photo_ids = [p for i in batch.todo for p in i.payload["photo_ids"]]
        v = person_photo_vectors
        with db.engine.connect() as conn:
            vector_of: dict[uuid.UUID, np.ndarray] = {
                r.photo_id: np.asarray(r.embedding, dtype=np.float32)
                for r in conn.execute(
                    select(v.c.photo_id, v.c.embedding).where(
                        v.c.photo_id.in_(photo_ids), v.c.step_version == PERSON_PHOTO.version, v.c.model_id == model_id
                    )
                )
            }
        outputs = {}
        for i in batch.todo:
            # A photo vector replaced since the items were read leaves the person stale (the ledger's
            # snapshot predates it), so the next run redoes it; no mix is ever called fresh.
            used = [vector_of[p] for p in i.payload["photo_ids"] if p in vector_of]
            mean = mean_unit_vector(used) if used else None
            if mean is None:
                outputs[i.item_id] = ItemOutput(error="the person's READY photo vectors sum to zero or are gone")
                continue
            row = {
                "person_id": i.payload["person_id"],
                "photo_count": len(used),
                "dimension": len(mean),
                "embedding": mean,
            }
            outputs[i.item_id] = ItemOutput(rows={STEP.table.name: [row]})
        return outputs

    run = run_step(context, db, STEP, {STEP.name: model_id, PERSON_PHOTO.name: model_id}, compute)
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(metadata=run.metadata(photo_step_version=PERSON_PHOTO.version))
