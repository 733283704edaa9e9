"""Generations: each step serves search from one complete generation while the next is built beside it.

A generation is (step, step version, model identity). The spec's current version under the model
the deployment expects is the step's *candidate*: the assets write it, freshness measures it. The
*active* generation is what every search reads; it changes only by a flip in one transaction:
automatically once the candidate covers every partition (no partition stale or missing), or by
``heimdex activate STEP`` (``--force`` below full coverage). ``heimdex rollback STEP`` swaps the
active and the previous generation back. Every flip is written to ``generation_events``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from heimdex_assets.freshness import partition_states
from heimdex_assets.steps import Step


class ActivationError(ValueError):
    """A flip that cannot be made (incomplete candidate without --force, nothing to roll back to)."""


@dataclass(frozen=True)
class Generation:
    """One generation of a step, and when and by whom it was last made active."""

    step: str
    version: str
    model_id: str
    activated_at: datetime | None = None
    activated_by: str | None = None
    reason: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.version, self.model_id)


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
            "SELECT step, step_version, model_id, activated_at, activated_by, reason FROM generations "
            "WHERE state = :state"
        ),
        {"state": state},
    )
    return {
        r.step: Generation(r.step, r.step_version, r.model_id, r.activated_at, r.activated_by, r.reason) for r in rows
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


def _flip(
    conn: Connection, step: str, version: str, model_id: str, actor: str, reason: str, details: dict, action: str
) -> None:
    """Make (version, model_id) the active generation of ``step``; the active one becomes previous."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('heimdex-generation:' || :step))"), {"step": step})
    target = {"step": step, "version": version, "model": model_id}
    # In this order, so that no statement ever sees two active or two previous generations.
    conn.execute(text("UPDATE generations SET state = 'retired' WHERE step = :step AND state = 'previous'"), target)
    conn.execute(text("UPDATE generations SET state = 'previous' WHERE step = :step AND state = 'active'"), target)
    params = target | {"actor": actor, "reason": reason, "details": json.dumps(details), "action": action}
    conn.execute(
        text(
            """INSERT INTO generations
                   (step, step_version, model_id, state, activated_at, activated_by, reason, coverage)
               VALUES (:step, :version, :model, 'active', now(), :actor, :reason, CAST(:details AS jsonb))
               ON CONFLICT (step, step_version, model_id) DO UPDATE SET state = 'active', activated_at = now(),
                   activated_by = EXCLUDED.activated_by, reason = EXCLUDED.reason, coverage = EXCLUDED.coverage"""
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


def activate(
    conn: Connection, step: Step, models: dict[str, str], *, actor: str, reason: str, force: bool = False
) -> Generation | None:
    """Make the candidate of ``step`` active in ``conn``'s transaction; None when it already is.

    Refused (ActivationError naming what is missing) below full coverage unless ``force``."""
    candidate = (step.version, models[step.name])
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
    _flip(conn, step.name, *candidate, actor, reason, {"coverage": covered.as_dict(), "forced": force}, "activate")
    return Generation(step.name, *candidate)


def activate_if_complete(conn: Connection, step: Step, models: dict[str, str], actor: str) -> Generation | None:
    """The automatic flip after a run: the candidate becomes active once it covers every partition."""
    try:
        return activate(conn, step, models, actor=actor, reason="candidate covers every partition")
    except ActivationError:
        return None


def rollback(conn: Connection, step: str, *, actor: str, reason: str) -> Generation:
    """Make the previous generation of ``step`` active again (the active one becomes previous)."""
    previous = previous_generations(conn).get(step)
    if previous is None:
        raise ActivationError(f"{step}: no previous generation to roll back to")
    _flip(conn, step, previous.version, previous.model_id, actor, reason, {}, "rollback")
    return previous
