"""Generations: each step serves search from one complete generation while the next is built beside it.

A generation is (step, step version, model identity). The spec's current version under the model
the deployment expects is the step's *candidate*: the assets write it, freshness measures it. The
*active* generation is what every search reads; it changes only by a flip in one transaction:
automatically once the candidate covers every partition (no partition stale or missing) and passes
the evaluation gate (``evaluation.py``: known-item MRR@10 no worse than the active one's beyond a
margin), or by ``heimdex activate STEP`` (``--force`` skips both checks). ``heimdex rollback STEP``
swaps the active and the previous generation back. Every flip, and every refusal by the gate, is
written to ``generation_events``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from heimdex_assets.evaluation import Evaluation, evaluate, gate_margin
from heimdex_assets.freshness import partition_states
from heimdex_assets.steps import Step


class ActivationError(ValueError):
    """A flip that cannot be made (incomplete candidate without --force, nothing to roll back to)."""


class GateRefusedError(ActivationError):
    """The evaluation gate found the candidate worse than the active generation; ``evaluation`` has the figures."""

    def __init__(self, message: str, evaluation: Evaluation) -> None:
        super().__init__(message)
        self.evaluation = evaluation


@dataclass(frozen=True)
class Generation:
    """One generation of a step, and when and by whom it was last made active."""

    step: str
    version: str
    model_id: str
    activated_at: datetime | None = None
    activated_by: str | None = None
    reason: str | None = None
    evaluation: dict | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.version, self.model_id)


def generation_dict(generation: Generation | None) -> dict[str, Any] | None:
    """A generation for JSON answers (CLI, API); None stays None."""
    if generation is None:
        return None
    return {
        "step_version": generation.version,
        "model_id": generation.model_id,
        "activated_at": generation.activated_at,
        "activated_by": generation.activated_by,
        "evaluation": generation.evaluation,
    }


@dataclass(frozen=True)
class Coverage:
    """How much of a generation is written: partitions per state, items done of items."""

    partitions: int
    states: dict[str, int]
    items: int
    items_done: int
    items_failed: int

    @property
    def complete(self) -> bool:
        """No partition stale or missing (failed items wait for their backoff, they do not block)."""
        return not self.states.get("stale") and not self.states.get("missing")

    def as_dict(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "states": self.states,
            "items": self.items,
            "items_done": self.items_done,
            "items_failed": self.items_failed,
            "complete": self.complete,
        }


def _generations(conn: Connection, state: str) -> dict[str, Generation]:
    rows = conn.execute(
        text(
            "SELECT step, step_version, model_id, activated_at, activated_by, reason, evaluation FROM generations "
            "WHERE state = :state"
        ),
        {"state": state},
    )
    return {
        r.step: Generation(r.step, r.step_version, r.model_id, r.activated_at, r.activated_by, r.reason, r.evaluation)
        for r in rows
    }


def active_generations(conn: Connection) -> dict[str, Generation]:
    """Step name → the generation searches read (absent before a step's first complete generation)."""
    return _generations(conn, "active")


def serving_generations(conn: Connection, configured: dict[str, str]) -> dict[str, Generation]:
    """What each step's searches read: its active generation; before a step's first flip (a deployment
    from before generations), the spec's current version under the deployment's model."""
    from heimdex_assets.models import deployment_models, recorded_models
    from heimdex_assets.steps import STEPS

    active = active_generations(conn)
    models = {name: row.model_id for name, row in recorded_models(conn).items()} | deployment_models(conn, configured)
    return {
        s.name: active.get(s.name) or Generation(s.name, s.version, models[s.name])
        for s in STEPS
        if s.name in active or s.name in models
    }


def previous_generations(conn: Connection) -> dict[str, Generation]:
    """Step name → the generation a rollback would make active again."""
    return _generations(conn, "previous")


def coverage(conn: Connection, step: Step, models: dict[str, str]) -> Coverage:
    """The coverage of ``step``'s candidate generation under ``models``."""
    states = partition_states(conn, step, models)
    counted: dict[str, int] = {}
    for s in states.values():
        counted[s.state] = counted.get(s.state, 0) + 1
    items = sum(s.items for s in states.values())
    stale = sum(s.stale_items for s in states.values())
    failed = sum(s.failed_items for s in states.values())
    return Coverage(len(states), counted, items, items - stale - failed, failed)


def _lock(conn: Connection, step: str) -> None:
    """Serialise flips of ``step`` (until the transaction ends): two runs finishing together flip once."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('heimdex-generation:' || :step))"), {"step": step})


def _flip(
    conn: Connection,
    step: str,
    version: str,
    model_id: str,
    actor: str,
    reason: str,
    details: dict,
    action: str,
    evaluation: Evaluation | None = None,
) -> None:
    """Make (version, model_id) the active generation of ``step``; the active one becomes previous.
    The caller holds the step's lock (``_lock``) since it read what it decided on."""
    target = {"step": step, "version": version, "model": model_id}
    # In this order, so that no statement ever sees two active or two previous generations.
    conn.execute(
        text("UPDATE generations SET state = 'retired', retired_at = now() WHERE step = :step AND state = 'previous'"),
        target,
    )
    conn.execute(text("UPDATE generations SET state = 'previous' WHERE step = :step AND state = 'active'"), target)
    measured = json.dumps(evaluation.as_dict()) if evaluation is not None else None
    params = target | {
        "actor": actor,
        "reason": reason,
        "details": json.dumps(details),
        "action": action,
        "evaluation": measured,
    }
    conn.execute(
        text(
            """INSERT INTO generations
                   (step, step_version, model_id, state, activated_at, activated_by, reason, coverage, evaluation)
               VALUES (:step, :version, :model, 'active', now(), :actor, :reason, CAST(:details AS jsonb),
                       CAST(:evaluation AS jsonb))
               ON CONFLICT (step, step_version, model_id) DO UPDATE SET state = 'active', activated_at = now(),
                   retired_at = NULL,
                   activated_by = EXCLUDED.activated_by, reason = EXCLUDED.reason, coverage = EXCLUDED.coverage,
                   -- a rollback measures nothing: the figures of its last activation stay
                   evaluation = COALESCE(EXCLUDED.evaluation, generations.evaluation)"""
        ),
        params,
    )
    conn.execute(
        text(
            "INSERT INTO generation_events (step, step_version, model_id, action, actor, reason, details) "
            "VALUES (:step, :version, :model, :action, :actor, :reason, CAST(:details AS jsonb))"
        ),
        params,
    )


def _record_refusal(conn: Connection, step: Step, models: dict[str, str], actor: str, ev: Evaluation) -> None:
    """A refusal is kept although the flip's transaction rolls back: in a transaction of its own."""
    candidate = (step.version, models[step.name])
    fingerprint = _fingerprint(conn, step, models)
    with conn.engine.begin() as own:
        own.execute(
            text(
                "INSERT INTO generation_events (step, step_version, model_id, action, actor, reason, details) "
                "VALUES (:step, :version, :model, 'gate_refused', :actor, :reason, CAST(:details AS jsonb))"
            ),
            {
                "step": step.name,
                "version": candidate[0],
                "model": candidate[1],
                "actor": actor,
                "reason": ev.summary(),
                "details": json.dumps({"evaluation": ev.as_dict(), "fingerprint": fingerprint}),
            },
        )


def last_refusal(conn: Connection, step: str, version: str, model_id: str) -> dict | None:
    """The latest gate refusal of a generation (its figures and when), None if never refused."""
    row = conn.execute(
        text(
            "SELECT at, details->'evaluation' AS evaluation FROM generation_events WHERE step = :step "
            "AND step_version = :version AND model_id = :model AND action = 'gate_refused' ORDER BY id DESC LIMIT 1"
        ),
        {"step": step, "version": version, "model": model_id},
    ).first()
    return {"at": row.at.isoformat(), **row.evaluation} if row is not None else None


def candidate_started(conn: Connection, step: str, version: str, model_id: str) -> datetime | None:
    """When the first partition of a generation was written (None: not yet)."""
    return conn.execute(
        text(
            "SELECT min(written_at) FROM partition_ledger WHERE step = :step AND step_version = :version "
            "AND model_id = :model"
        ),
        {"step": step, "version": version, "model": model_id},
    ).scalar()


def activate(
    conn: Connection,
    step: Step,
    models: dict[str, str],
    *,
    actor: str,
    reason: str,
    force: bool = False,
    resources: Mapping[str, Any] | None = None,
) -> Generation | None:
    """Make the candidate of ``step`` active in ``conn``'s transaction; None when it already is.

    Refused (ActivationError naming what is missing) below full coverage, and (GateRefusedError, with
    the figures, also recorded as a ``gate_refused`` event) when the evaluation gate, run with the
    models of ``resources``, finds it worse than the active generation; ``force`` skips both refusals
    (the gate still runs and its figures are kept). Without ``resources`` the gate is not run."""
    candidate = (step.version, models[step.name])
    _lock(conn, step.name)
    active = active_generations(conn).get(step.name)
    if active is not None and active.key == candidate:
        return None
    covered = coverage(conn, step, models)
    if not covered.complete and not force:
        missing = ", ".join(
            f"{n} {state}" for state, n in sorted(covered.states.items()) if state in ("stale", "missing")
        )
        raise ActivationError(
            f"{step.name}: candidate {candidate[0]} / {candidate[1]} does not cover every partition yet ({missing} "
            f"of {covered.partitions}; items {covered.items_done}/{covered.items} done): use --force to activate anyway"
        )
    evaluation = evaluate(conn, step, candidate, active, resources) if resources is not None else None
    if evaluation is not None and not evaluation.passed and not force:
        _record_refusal(conn, step, models, actor, evaluation)
        raise GateRefusedError(
            f"{step.name}: candidate {candidate[0]} / {candidate[1]} refused, {evaluation.summary()}: "
            "use --force to activate anyway",
            evaluation,
        )
    details = {
        "coverage": covered.as_dict(),
        "forced": force,
        "evaluation": evaluation.as_dict() if evaluation is not None else None,
    }
    _flip(conn, step.name, *candidate, actor, reason, details, "activate", evaluation)
    return Generation(step.name, *candidate, evaluation=evaluation.as_dict() if evaluation is not None else None)


def _some_partition_unwritten(conn: Connection, step: Step, models: dict[str, str]) -> bool:
    """Whether some partition has no ledger row of the candidate yet: the cheap answer (it stops at the
    first one) while a backfill is under way, so that each run does not pay for a full coverage count."""
    universe = (
        "SELECT v.id FROM videos v WHERE v.status = 'READY'"
        if step.partitioning == "video"
        else "SELECT o.id FROM owners o"
    )
    return conn.execute(
        text(
            f"""SELECT EXISTS (SELECT 1 FROM ({universe}) u WHERE NOT EXISTS (
                    SELECT 1 FROM partition_ledger l WHERE l.step = :step AND l.partition_id = u.id
                    AND l.step_version = :version AND l.model_id = :model))"""
        ),
        {"step": step.name, "version": step.version, "model": models[step.name]},
    ).scalar_one()


def _fingerprint(conn: Connection, step: Step, models: dict[str, str]) -> str:
    """What a gate verdict on the candidate depends on: the margin, the active generation, and the
    candidate's rows (their count and newest write: a run that rewrites nothing leaves both alone)."""
    active = active_generations(conn).get(step.name)
    rows = conn.execute(
        text(
            f"SELECT count(*), max(created_at) FROM {step.table.name} "
            "WHERE step_version = :version AND model_id = :model"
        ),
        {"version": step.version, "model": models[step.name]},
    ).one()
    return f"{gate_margin()}|{active.key if active else None}|{rows[0]}|{rows[1]}"


def _refused_unchanged(conn: Connection, step: Step, models: dict[str, str]) -> bool:
    """Whether the gate's last refusal of the candidate still holds: nothing it measured has changed."""
    refused = conn.execute(
        text(
            "SELECT details->>'fingerprint' FROM generation_events WHERE step = :step AND step_version = :version "
            "AND model_id = :model AND action = 'gate_refused' ORDER BY id DESC LIMIT 1"
        ),
        {"step": step.name, "version": step.version, "model": models[step.name]},
    ).scalar()
    return refused is not None and refused == _fingerprint(conn, step, models)


@dataclass(frozen=True)
class AutoActivation:
    """What the automatic flip did: ``activated`` (or None), and why not when it did not."""

    activated: Generation | None
    why_not: str = ""
    evaluation: dict | None = None


def activate_if_complete(
    conn: Connection, step: Step, models: dict[str, str], actor: str, resources: Mapping[str, Any] | None = None
) -> AutoActivation:
    """The automatic flip after a run: the candidate becomes active once it covers every partition and
    passes the evaluation gate (run with ``resources``' models)."""
    active = active_generations(conn).get(step.name)
    if active is not None and active.key == (step.version, models[step.name]):
        return AutoActivation(None, "already active")
    if _some_partition_unwritten(conn, step, models):
        return AutoActivation(None, "candidate not complete")
    if _refused_unchanged(conn, step, models):
        refused = last_refusal(conn, step.name, step.version, models[step.name])
        return AutoActivation(None, "refused by the evaluation gate (unchanged since)", refused)
    try:
        flipped = activate(
            conn, step, models, actor=actor, reason="candidate covers every partition", resources=resources
        )
        return AutoActivation(flipped, "" if flipped else "already active", flipped.evaluation if flipped else None)
    except GateRefusedError as exc:
        return AutoActivation(None, str(exc), exc.evaluation.as_dict())
    except ActivationError as exc:
        return AutoActivation(None, str(exc))


def rollback(conn: Connection, step: str, *, actor: str, reason: str) -> Generation:
    """Make the previous generation of ``step`` active again (the active one becomes previous)."""
    _lock(conn, step)
    previous = previous_generations(conn).get(step)
    if previous is None:
        raise ActivationError(f"{step}: no previous generation to roll back to")
    _flip(conn, step, previous.version, previous.model_id, actor, reason, {}, "rollback")
    return previous


PRUNE_GRACE = timedelta(days=7)
PRUNE_BATCH = 5000


@dataclass(frozen=True)
class Prunable:
    """A generation that no search reads and no run writes, idle since ``idle_since``."""

    step: str
    version: str
    model_id: str
    idle_since: datetime | None


def prunable_generations(conn: Connection, models: dict[str, str], grace: timedelta = PRUNE_GRACE) -> list[Prunable]:
    """Generations older than the previous one: neither active, previous nor the candidate, and idle
    (not written, not served) for longer than ``grace``."""
    from heimdex_assets.steps import STEPS

    active, previous = active_generations(conn), previous_generations(conn)
    now = conn.execute(text("SELECT now()")).scalar_one()
    out = []
    for step in STEPS:
        kept = {(step.version, models[step.name])}
        kept |= {g.key for g in (active.get(step.name), previous.get(step.name)) if g is not None}
        found = conn.execute(
            text(
                f"""SELECT r.step_version, r.model_id, max(greatest(l.last_written, g.retired_at)) AS idle_since
                    FROM (SELECT DISTINCT step_version, model_id FROM {step.table.name}) r
                    LEFT JOIN (SELECT step_version, model_id, max(written_at) AS last_written FROM partition_ledger
                               WHERE step = :step GROUP BY 1, 2) l USING (step_version, model_id)
                    LEFT JOIN generations g
                           ON g.step = :step AND (g.step_version, g.model_id) = (r.step_version, r.model_id)
                    GROUP BY 1, 2"""
            ),
            {"step": step.name},
        )
        for r in found:
            if (r.step_version, r.model_id) not in kept and (r.idle_since is None or r.idle_since < now - grace):
                out.append(Prunable(step.name, r.step_version, r.model_id, r.idle_since))
    return out


def prune_generation(engine: Any, generation: Prunable, batch: int = PRUNE_BATCH) -> int:
    """Delete a prunable generation's rows in batches (one transaction each), then its ledger, failures and
    record; returns the rows deleted. Search indexes are the caller's (``prune`` drops them)."""
    from heimdex_assets.steps import step as step_named

    step = step_named(generation.step)
    gen = {"step": step.name, "version": generation.version, "model": generation.model_id, "batch": batch}
    deleted = 0
    for table in (*step.extra_tables, step.table):
        while True:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL heimdex.pruning = 'on'"))
                n = conn.execute(
                    text(
                        f"DELETE FROM {table.name} WHERE ctid IN (SELECT ctid FROM {table.name} "
                        "WHERE step_version = :version AND model_id = :model LIMIT :batch)"
                    ),
                    gen,
                ).rowcount
            deleted += n
            if n < batch:
                break
    with engine.begin() as conn:
        where = "step = :step AND step_version = :version AND model_id = :model"
        for table in ("partition_ledger", "embedding_failures"):
            conn.execute(text(f"DELETE FROM {table} WHERE {where}"), gen)
        conn.execute(text(f"DELETE FROM generations WHERE {where} AND state = 'retired'"), gen)
        conn.execute(
            text(
                "INSERT INTO generation_events (step, step_version, model_id, action, actor, reason, details) "
                "VALUES (:step, :version, :model, 'prune', 'heimdex prune', 'past the grace period', "
                "CAST(:details AS jsonb))"
            ),
            gen | {"details": json.dumps({"rows_deleted": deleted})},
        )
    return deleted


def prune(db: Any, search_index: Any, models: dict[str, str], grace: timedelta = PRUNE_GRACE) -> list[dict[str, Any]]:
    """Prune every prunable generation (rows in batches; the search index of a version nothing kept
    uses any more); never the active, the previous or the candidate one."""
    with db.engine.connect() as conn:
        prunable = prunable_generations(conn, models, grace)
        kept_versions = {
            g.version
            for g in (active_generations(conn).get("scene_search"), previous_generations(conn).get("scene_search"))
            if g is not None
        }
    from heimdex_assets.steps import SCENE_SEARCH

    kept_versions.add(SCENE_SEARCH.version)
    report = []
    for g in prunable:
        rows = prune_generation(db.engine, g)
        dropped = None
        if g.step == "scene_search" and g.version not in kept_versions and search_index.index_identity(g.version):
            search_index.drop_version(g.version)
            dropped = search_index.index_name(g.version)
        report.append(
            {
                "step": g.step,
                "step_version": g.version,
                "model_id": g.model_id,
                "rows_deleted": rows,
                "index_dropped": dropped,
            }
        )
    return report
