"""``person_query_embeddings``: per person, the L2-normalised mean of its READY photo vectors."""

import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence

import dagster as dg
import numpy as np
from sqlalchemy import select

from heimdex_assets.assets.owner_runs import load_owner_run
from heimdex_assets.assets.person_photo import person_photo_embeddings
from heimdex_assets.assets.video_runs import OWNER_SCOPE_TAG
from heimdex_assets.db.tables import person_photo_vectors, person_query_vectors, person_reference_photos, persons
from heimdex_assets.db.vectors import replace_owner_rows
from heimdex_assets.partitions import owners_partitions
from heimdex_assets.resources import AppDatabase
from heimdex_assets.spec import SPEC

STEP = SPEC.step("person_query")
PHOTO_STEP = SPEC.step("person_photo")


def photo_set_sha256(photos: Iterable[tuple[uuid.UUID, str]]) -> str:
    """The input hash of a query vector: sha256 of the sorted ``photo_id:input_sha256`` lines."""
    lines = sorted(f"{photo_id}:{sha}" for photo_id, sha in photos)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def mean_unit_vector(vectors: Sequence[np.ndarray]) -> np.ndarray | None:
    """The L2-normalised mean of ``vectors`` (in float64), or None when the mean is zero."""
    mean = np.mean(np.asarray(vectors, dtype=np.float64), axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 0 else None


@dg.asset(
    key="person_query_embeddings",
    partitions_def=owners_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"postgres"},
    group_name="person_embeddings",
    deps=[person_photo_embeddings],
    description=STEP.description,
)
def person_query_embeddings(context: dg.AssetExecutionContext, db: AppDatabase) -> dg.MaterializeResult:
    """One query vector per person of every owner in the run, from the current photo vectors."""
    started = time.monotonic()
    photos, vectors = person_reference_photos, person_photo_vectors
    with db.engine.connect() as conn:
        run = load_owner_run(conn, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG))
        people = conn.execute(
            select(persons.c.id, persons.c.owner_id, persons.c.name)
            .where(persons.c.owner_id.in_(run.owner_ids))
            .order_by(persons.c.owner_id, persons.c.id)
        ).all()
        # The photo table says whose photo it is and whether it is READY; the vector, at the
        # photo step's current version, says what it looks like.
        photo_vectors = conn.execute(
            select(
                photos.c.person_id,
                vectors.c.photo_id,
                vectors.c.model_id,
                vectors.c.input_sha256,
                vectors.c.embedding,
                vectors.c.created_at,
            )
            .join(photos, photos.c.id == vectors.c.photo_id)
            .where(
                vectors.c.owner_id.in_(run.owner_ids),
                photos.c.owner_id == vectors.c.owner_id,
                vectors.c.step_version == PHOTO_STEP.version,
                photos.c.status == "READY",
            )
            .order_by(photos.c.person_id, vectors.c.photo_id)
        ).all()

    of_person = defaultdict(list)
    for r in photo_vectors:
        of_person[r.person_id].append(r)
    rows_of: dict[uuid.UUID, list[dict]] = {o: [] for o in run.owner_ids}
    without_vector: dict[str, str] = {}
    for person in people:
        found = of_person.get(person.id, [])
        # Vectors of two models live in different spaces: average only the newest model's.
        model_id = max(found, key=lambda r: (r.created_at, r.model_id)).model_id if found else None
        used = [r for r in found if r.model_id == model_id]
        mean = mean_unit_vector([r.embedding for r in used]) if used else None
        if mean is None:
            without_vector[str(person.id)] = person.name
            continue
        rows_of[person.owner_id].append(
            {
                "person_id": person.id,
                "step_version": STEP.version,
                "owner_id": person.owner_id,
                "model_id": model_id,
                "input_sha256": photo_set_sha256((r.photo_id, r.input_sha256) for r in used),
                "photo_count": len(used),
                "dimension": len(mean),
                "embedding": mean,
            }
        )

    for owner_id, rows in rows_of.items():
        with db.transaction() as conn:  # one transaction per partition: old state or new, never a mix
            # Persons without a READY photo, and deleted persons, lose their vector at this version.
            replace_owner_rows(conn, person_query_vectors, owner_id, STEP.version, rows, ["person_id", "step_version"])

    for person_id, name in without_vector.items():
        context.log.info(f"person {person_id} ({name}) has no READY photo at {PHOTO_STEP.version}: no query vector")
    run.fail_if_rejected()
    return dg.MaterializeResult(
        metadata={
            "owners": len(run.owner_ids),
            "persons": len(people),
            "vectors_written": sum(len(r) for r in rows_of.values()),
            "persons_without_ready_photo": dg.MetadataValue.json(without_vector),
            "step_version": STEP.version,
            "photo_step_version": PHOTO_STEP.version,
            "model_ids": dg.MetadataValue.json(sorted({r["model_id"] for rs in rows_of.values() for r in rs})),
            "seconds": round(time.monotonic() - started, 3),
        }
    )
