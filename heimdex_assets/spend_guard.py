"""The spend guard: an automatic launch (the stale sensor) starts a plan on its own only while the OpenAI
estimate of what it launched in the last 24 hours, plus this plan's, stays within a ceiling in tokens and
in dollars a day. Above it, the plan is recorded as waiting for approval (one waits at a time: a newer
stale set supersedes it) and nothing is launched until an operator approves it (``heimdex approve PLAN_ID``
or ``POST /v1/admin/reprocess-plans/{id}/approve``), which launches exactly the recorded partitions.

Every automatic launch is recorded too (status ``launched``): those rows are the day's automatic spend.
An approved plan is a person's decision and does not count against the automatic ceiling.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, Row, func, select, text, update

from heimdex_assets.db.tables import reprocess_plans
from heimdex_assets.reprocess import AssetPlan, ReprocessPlan, ReprocessRequest
from heimdex_assets.steps import STEPS

MAX_TOKENS_ENV = "HEIMDEX_AUTO_MAX_TOKENS_PER_DAY"
MAX_USD_ENV = "HEIMDEX_AUTO_MAX_USD_PER_DAY"
# About $0.20 a day of text-embedding-3-small: a handful of edited videos pass, a model change waits.
DEFAULT_MAX_TOKENS_PER_DAY = 10_000_000
DEFAULT_MAX_USD_PER_DAY = 1.00
# Serialises the guard's read of the day's spend with its record of a launch (any 64-bit constant).
_GUARD_LOCK = 0x6865696D64657831


class SpendGuardError(RuntimeError):
    """A plan that cannot be approved (unknown, already launched, superseded, made for another spec)."""


class PlanNotFoundError(SpendGuardError):
    """No plan has this id."""


@dataclass(frozen=True)
class SpendCeiling:
    """What automatic launches may spend in any 24 hours, by the plans' OpenAI estimates."""

    tokens_per_day: int = DEFAULT_MAX_TOKENS_PER_DAY
    usd_per_day: float = DEFAULT_MAX_USD_PER_DAY

    @classmethod
    def from_env(cls) -> SpendCeiling:
        """``HEIMDEX_AUTO_MAX_TOKENS_PER_DAY`` and ``HEIMDEX_AUTO_MAX_USD_PER_DAY`` (0: every plan that costs
        anything waits); ValueError naming the variable for a malformed value."""
        tokens = os.environ.get(MAX_TOKENS_ENV, "").strip().replace("_", "")
        usd = os.environ.get(MAX_USD_ENV, "").strip()
        if tokens and not tokens.isdigit():
            raise ValueError(f"{MAX_TOKENS_ENV} must be a whole number of tokens, got {tokens!r}")
        try:
            dollars = float(usd) if usd else DEFAULT_MAX_USD_PER_DAY
        except ValueError:
            raise ValueError(f"{MAX_USD_ENV} must be a number of dollars, got {usd!r}") from None
        if not dollars >= 0:  # also NaN
            raise ValueError(f"{MAX_USD_ENV} must be 0 or more, got {usd!r}")
        return cls(int(tokens) if tokens else DEFAULT_MAX_TOKENS_PER_DAY, dollars)


@dataclass(frozen=True)
class Verdict:
    """Whether a plan may start on its own, and in words why (or why not)."""

    allowed: bool
    reason: str
    spent_tokens: int
    spent_usd: float


@dataclass(frozen=True)
class StoredPlan:
    """A row of ``reprocess_plans``."""

    id: uuid.UUID
    created_at: datetime
    created_by: str
    status: str
    fingerprint: str
    assets: dict[str, dict]
    partitions: int
    estimated_tokens: int
    estimated_usd: float
    reason: str | None
    approved_by: str | None
    approved_at: datetime | None
    launched_at: datetime | None
    backfill_ids: list[str] | None

    def as_dict(self) -> dict:
        """For JSON: the plan with its partition counts per asset (not the keys themselves)."""
        return {
            "plan_id": str(self.id),
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "status": self.status,
            "assets": {k: len(a["partitions"]) for k, a in self.assets.items()},
            "partitions": self.partitions,
            "estimated_tokens": self.estimated_tokens,
            "estimated_usd": round(self.estimated_usd, 6),
            "reason": self.reason,
            "approved_by": self.approved_by,
            "launched_at": self.launched_at.isoformat() if self.launched_at else None,
            "backfill_ids": self.backfill_ids,
        }


def spent_last_day(conn: Connection) -> tuple[int, float]:
    """Tokens and dollars (estimates) of the plans launched automatically in the last 24 hours."""
    row = conn.execute(
        select(
            func.coalesce(func.sum(reprocess_plans.c.estimated_tokens), 0),
            func.coalesce(func.sum(reprocess_plans.c.estimated_usd), 0.0),
        ).where(
            reprocess_plans.c.status == "launched",
            reprocess_plans.c.approved_by.is_(None),
            reprocess_plans.c.launched_at > func.now() - text("interval '24 hours'"),
        )
    ).one()
    return int(row[0]), float(row[1])


def judge(conn: Connection, ceiling: SpendCeiling, tokens: int, usd: float) -> Verdict:
    """May a plan estimated at ``tokens`` / ``usd`` start on its own, given what started in the last day?"""
    spent_tokens, spent_usd = spent_last_day(conn)
    day = f"last 24 h: {spent_tokens:,} tokens, ${spent_usd:.4f}"
    if tokens == 0 and usd == 0:
        return Verdict(True, "costs no OpenAI tokens", spent_tokens, spent_usd)
    if spent_tokens + tokens > ceiling.tokens_per_day:
        reason = (
            f"estimate {tokens:,} tokens would take the automatic spend over {ceiling.tokens_per_day:,} tokens a day "
            f"({MAX_TOKENS_ENV}; {day})"
        )
        return Verdict(False, reason, spent_tokens, spent_usd)
    if spent_usd + usd > ceiling.usd_per_day:
        reason = (
            f"estimate ${usd:.4f} would take the automatic spend over ${ceiling.usd_per_day:.2f} a day "
            f"({MAX_USD_ENV}; {day})"
        )
        return Verdict(False, reason, spent_tokens, spent_usd)
    return Verdict(True, f"estimate {tokens:,} tokens, ${usd:.4f}, within the ceiling ({day})", spent_tokens, spent_usd)


def plan_assets(plan: ReprocessPlan) -> dict[str, dict]:
    """What a stored plan keeps of ``plan``: per asset that redoes anything, its generation and partition keys."""
    return {
        k: {"step_version": a.step_version, "model_id": a.model_id, "partitions": sorted(a.partitions)}
        for k, a in plan.assets.items()
        if a.partitions
    }


def fingerprint(assets: dict[str, dict]) -> str:
    """The same stale set under the same generations gives the same fingerprint (the sensor records it once)."""
    return hashlib.sha256(json.dumps(assets, sort_keys=True).encode()).hexdigest()


def lock_guard(conn: Connection) -> None:
    """Held until the transaction ends: one judge-and-record at a time, across processes."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _GUARD_LOCK})


def record_plan(
    conn: Connection,
    plan: ReprocessPlan,
    *,
    created_by: str,
    status: str,
    reason: str,
    backfill_ids: list[str] | None = None,
) -> tuple[StoredPlan, bool]:
    """Record ``plan`` as ``launched`` (now) or ``waiting``; for a waiting plan the same as the one already
    waiting is kept as it is, and another one waiting is superseded. The stored plan, and whether it is new."""
    assets = plan_assets(plan)
    fp = fingerprint(assets)
    if status == "waiting":
        current = waiting_plan(conn)
        if current is not None and current.fingerprint == fp:
            return current, False
        supersede_waiting(conn)
    row = conn.execute(
        reprocess_plans.insert()
        .values(
            id=uuid.uuid4(),
            created_at=func.now(),
            created_by=created_by,
            status=status,
            fingerprint=fp,
            assets=assets,
            partitions=sum(len(a["partitions"]) for a in assets.values()),
            estimated_tokens=plan.estimated_openai_tokens,
            estimated_usd=plan.estimated_openai_cost_usd,
            reason=reason,
            launched_at=func.now() if status == "launched" else None,
            backfill_ids=backfill_ids,
        )
        .returning(*reprocess_plans.c)
    ).one()
    return _stored(row), True


def supersede_waiting(conn: Connection) -> None:
    """The plan waiting, if any, no longer stands for what is stale (a newer plan does, or one started)."""
    conn.execute(update(reprocess_plans).where(reprocess_plans.c.status == "waiting").values(status="superseded"))


def waiting_plan(conn: Connection) -> StoredPlan | None:
    """The plan waiting for approval, if any."""
    row = conn.execute(select(reprocess_plans).where(reprocess_plans.c.status == "waiting")).first()
    return _stored(row) if row is not None else None


def recent_plans(conn: Connection, limit: int = 20) -> list[StoredPlan]:
    """The latest plans, newest first."""
    q = select(reprocess_plans).order_by(reprocess_plans.c.created_at.desc(), reprocess_plans.c.id).limit(limit)
    return [_stored(r) for r in conn.execute(q)]


def get_plan(conn: Connection, plan_id: uuid.UUID) -> StoredPlan:
    """The plan ``plan_id``; PlanNotFoundError otherwise."""
    row = conn.execute(select(reprocess_plans).where(reprocess_plans.c.id == plan_id)).first()
    if row is None:
        raise PlanNotFoundError(f"no reprocess plan {plan_id}")
    return _stored(row)


def rebuild(stored: StoredPlan, models: dict[str, str]) -> ReprocessPlan:
    """The stored plan as a ReprocessPlan over exactly its partitions, for the launchers; SpendGuardError when a
    step's spec version or model changed since it was recorded (the sensor records a new plan for those)."""
    plan = ReprocessPlan(ReprocessRequest(scope="all"), None, 0, {})
    for step in STEPS:
        recorded = stored.assets.get(step.asset_key)
        asset = AssetPlan(step.asset_key, step.version, models[step.name])
        if recorded is not None:
            if (recorded["step_version"], recorded["model_id"]) != (step.version, models[step.name]):
                raise SpendGuardError(
                    f"plan {stored.id} was made for {step.asset_key} {recorded['step_version']} / "
                    f"{recorded['model_id']}, now {step.version} / {models[step.name]}: the stale sensor's next "
                    "tick records a plan for what is stale now"
                )
            asset.partitions = list(recorded["partitions"])
        plan.assets[step.asset_key] = asset
    video_keys = {k for s in STEPS if s.partitioning == "video" for k in plan.assets[s.asset_key].partitions}
    plan.video_count = len(video_keys)
    plan.estimated_openai_tokens, plan.estimated_openai_cost_usd = stored.estimated_tokens, stored.estimated_usd
    return plan


def approve(
    engine: Engine,
    plan_id: uuid.UUID,
    approved_by: str,
    models: dict[str, str],
    launch: Callable[[ReprocessPlan], list[str]],
) -> StoredPlan:
    """Launch the waiting plan ``plan_id`` with ``launch`` (which returns the backfill ids, or none for runs in
    this process) and record who approved it. The plan is claimed first, so two approvals never launch it twice;
    if the launch fails the plan waits again and the error goes up."""
    with engine.begin() as conn:
        lock_guard(conn)
        stored = get_plan(conn, plan_id)
        if stored.status != "waiting":
            done = f" (backfills {', '.join(stored.backfill_ids)})" if stored.backfill_ids else ""
            raise SpendGuardError(f"plan {plan_id} is {stored.status}{done}: only a waiting plan can be approved")
        plan = rebuild(stored, models)
        conn.execute(
            update(reprocess_plans)
            .where(reprocess_plans.c.id == plan_id)
            .values(status="launched", approved_by=approved_by, approved_at=func.now(), launched_at=func.now())
        )
    try:
        backfill_ids = launch(plan)
    except BaseException:
        with engine.begin() as conn:  # waiting again, unless the sensor recorded a newer plan meanwhile
            lock_guard(conn)
            newer = waiting_plan(conn) is not None
            values = {"approved_by": None, "approved_at": None, "launched_at": None}
            status = "superseded" if newer else "waiting"
            conn.execute(update(reprocess_plans).where(reprocess_plans.c.id == plan_id).values(status=status, **values))
        raise
    with engine.begin() as conn:
        conn.execute(
            update(reprocess_plans).where(reprocess_plans.c.id == plan_id).values(backfill_ids=backfill_ids or None)
        )
        return get_plan(conn, plan_id)


def _stored(row: Row) -> StoredPlan:
    m = row._mapping
    return StoredPlan(**{name: m[name] for name in StoredPlan.__dataclass_fields__})
