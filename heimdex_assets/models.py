"""Model identities: what each step's rows must be made by, known from configuration alone.

A step's model identity is the model id plus every setting that changes its output (the person
detector's settings for the steps that crop people; the index itself for the search step). It
is read from the resources' configuration, never by loading a model.

The deployment records, per step, the identity it expects (``step_models``): the first writer
records its own, ``heimdex demo`` and ``heimdex models use`` record the configured ones. Every
process reads the record, so status, search and workers agree; a worker configured otherwise
refuses to write rather than mix two models' vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert

from heimdex_assets.db.tables import step_models
from heimdex_assets.spec import SPEC

NO_INDEX = "none"  # the search step's identity while its index does not exist
PLACEHOLDER_HINT = "; the demo recorded placeholder weights: set HEIMDEX_CLIP_MODEL=tiny-random"
RECORDED_STEPS = ("scene_text", "scene_clip", "scene_person", "person_photo", "person_query")


class ModelMismatchError(RuntimeError):
    """A worker configured with another model than the deployment expects; the message says what to do."""


def person_identity(clip: Any, person_detector: Any) -> str:
    """CLIP over the detector's crops: both the model and the detector's settings shape the vector."""
    return f"{clip.model_id}+{person_detector.identity}"


def configured_models(resources: Mapping[str, Any], *, search: bool = True) -> dict[str, str]:
    """Step name → the model identity this process's configuration gives (no model is loaded).

    ``search=False`` leaves the search index unasked (its identity is then ``none``).
    """
    person = person_identity(resources["clip"], resources["person_detector"])
    index = resources["search_index"].index_identity(SPEC.step("scene_search").version) if search else None
    return {
        "scene_text": resources["text_embedder"].model_id,
        "scene_clip": resources["clip"].model_id,
        "scene_person": person,
        "person_photo": person,
        "person_query": person,  # the mean of person_photo's vectors
        "scene_search": index or NO_INDEX,
    }


def recorded_models(conn: Connection) -> dict[str, Any]:
    """Step name → its ``step_models`` row (model_id, recorded_at, recorded_by)."""
    return {r.step: r for r in conn.execute(select(step_models))}


def deployment_models(conn: Connection, configured: Mapping[str, str]) -> dict[str, str]:
    """The identities the deployment expects: the recorded ones, the configured ones where none is."""
    recorded = recorded_models(conn)
    return {name: (recorded[name].model_id if name in recorded else model) for name, model in configured.items()}


def expected_models(conn: Connection, resources: Mapping[str, Any]) -> dict[str, str]:
    """``deployment_models`` under this process's configuration: what every row must be made by."""
    return deployment_models(conn, configured_models(resources))


def record_models(conn: Connection, models: Mapping[str, str], recorded_by: str) -> None:
    """Record ``models`` as the deployment's (replacing earlier records of those steps)."""
    rows = [{"step": k, "model_id": v, "recorded_by": recorded_by} for k, v in models.items() if k in RECORDED_STEPS]
    if rows:
        stmt = insert(step_models)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["step"],
                set_={"model_id": stmt.excluded.model_id, "recorded_by": stmt.excluded.recorded_by},
                where=step_models.c.model_id.is_distinct_from(stmt.excluded.model_id),
            ),
            rows,
        )


def require_model(conn: Connection, step: str, model_id: str, worker: str = "this worker") -> None:
    """Raise ModelMismatchError unless ``model_id`` is what the deployment expects of ``step``; the first
    writer of a step records its model as the expected one (in the caller's transaction)."""
    if step not in RECORDED_STEPS:
        return
    conn.execute(
        insert(step_models)
        .values(step=step, model_id=model_id, recorded_by=f"first write ({worker})")
        .on_conflict_do_nothing(index_elements=["step"])
    )
    row = conn.execute(select(step_models).where(step_models.c.step == step)).one()
    if row.model_id != model_id:
        raise ModelMismatchError(
            f"{step}: {worker} is configured for {model_id}, but the deployment expects {row.model_id} "
            f"(recorded {row.recorded_at:%Y-%m-%d %H:%M} by {row.recorded_by}); configure it to match, "
            "or run `heimdex models use` to move the deployment to the configured models"
            + (PLACEHOLDER_HINT if "tiny-random" in row.model_id else "")
        )


def model_resources(text_embedder: Any, clip: Any, person_detector: Any, search_index: Any) -> dict[str, Any]:
    """The resources ``expected_models`` reads, from a Dagster definition's own resource parameters."""
    return {
        "text_embedder": text_embedder,
        "clip": clip,
        "person_detector": person_detector,
        "search_index": search_index,
    }
