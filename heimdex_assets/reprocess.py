"""Reprocessing, the seed's capability on top of Dagster: which partitions to redo, and redoing them.

``plan_reprocess`` resolves a scope (one video, one owner, everything; optionally only videos
updated since a time) to the partitions each asset must redo: stale and missing ones by the SQL
freshness of ``freshness.py``, every one with ``force``, failed ones too with ``retry_failed``; with
``steps``, only for those steps and the steps downstream of them (the others are still counted, so an
operator sees what was left stale). It estimates what the text step would cost on the OpenAI API
(texts not in the cache only), counting tokens with the model's own tokenizer (``tokens.py``).
``run_plan`` materialises the plan in-process in contiguous ranges, with the owner scope as a run tag;
``failed_items`` then names the items its runs could not compute, with their reasons.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, select, text

from heimdex_assets.db.tables import persons, videos
from heimdex_assets.freshness import PartitionState, partition_states
from heimdex_assets.runs import FORCE_TAG, OWNER_SCOPE_TAG, RETRY_FAILED_TAG
from heimdex_assets.steps import STEPS, Step, downstream, step_for_asset
from heimdex_assets.steps import step as step_named
from heimdex_assets.tokens import BYTES_PER_TOKEN_ESTIMATE, count_tokens

Scope = Literal["video", "owner", "all"]
# USD per 1M input tokens (OpenAI price list, 2026-01).
OPENAI_PRICE_PER_MILLION = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}
# Input bytes whose tokens a plan counts with the tokenizer (about 1.5 s of tokenizing); past them, the
# rest is extrapolated at the tokens-per-byte ratio just measured, so a plan over a whole corpus stays fast.
EXACT_TOKEN_BYTES = 8 * 2**20
TOKEN_COUNT_BATCH = 500  # partitions whose texts are read at a time


class ReprocessError(ValueError):
    """A request that cannot be planned (missing id for its scope, a video not READY)."""


class ScopeNotFoundError(ReprocessError):
    """The scope's video or owner does not exist (or, equally, belongs to another owner)."""


@dataclass(frozen=True)
class ReprocessRequest:
    """What to reprocess; the seed's request plus ``since`` and explicit failure retries."""

    scope: Scope
    video_id: uuid.UUID | None = None
    owner_id: uuid.UUID | None = None
    since: datetime | None = None
    force: bool = False
    retry_failed: bool = False
    # Only these steps (names, or their asset keys) and the steps downstream of them; None: every step.
    steps: tuple[str, ...] | None = None


@dataclass
class AssetPlan:
    """One asset's share of a plan: the partitions to run and the items behind them. An asset that was not
    selected (``selected`` False) runs nothing; its states and counts say what it leaves stale."""

    asset_key: str
    step_version: str
    model_id: str
    partitions: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    items_stale: int = 0
    items_failed: int = 0
    selected: bool = True
    partitions_left: int = 0  # partitions it would redo if selected


@dataclass
class ReprocessPlan:
    """Per asset, what will run; the scope's owner (when scoped) and the OpenAI estimate."""

    request: ReprocessRequest
    owner_scope: uuid.UUID | None
    video_count: int
    assets: dict[str, AssetPlan]
    estimated_openai_tokens: int = 0
    estimated_openai_cost_usd: float = 0.0
    # True when every estimated token was counted by the model's tokenizer (not extrapolated or from bytes).
    estimate_exact: bool = True

    @property
    def empty(self) -> bool:
        return not any(a.partitions for a in self.assets.values())


def _scope_videos(conn: Connection, request: ReprocessRequest) -> tuple[list[uuid.UUID], uuid.UUID | None]:
    """READY videos of the scope (updated since ``since`` if given) and the owner the scope is bound to."""
    if request.scope == "video":
        if request.video_id is None:
            raise ReprocessError("scope video needs a video id")
        row = conn.execute(select(videos.c.owner_id, videos.c.status).where(videos.c.id == request.video_id)).first()
        if row is None or (request.owner_id is not None and row.owner_id != request.owner_id):
            # Same answer for "absent" and "another owner's": existence is not leaked across tenants.
            owner = f" for owner {request.owner_id}" if request.owner_id else ""
            raise ScopeNotFoundError(f"video {request.video_id} not found{owner}")
        if row.status != "READY":
            raise ReprocessError(f"video {request.video_id} is {row.status}, not READY: nothing to reprocess")
        owner_scope = row.owner_id
    elif request.scope == "owner":
        if request.owner_id is None:
            raise ReprocessError("scope owner needs an owner id")
        if conn.execute(text("SELECT 1 FROM owners WHERE id = :o"), {"o": request.owner_id}).first() is None:
            raise ScopeNotFoundError(f"owner {request.owner_id} not found")
        owner_scope = request.owner_id
    else:
        owner_scope = None
    q = select(videos.c.id).where(videos.c.status == "READY")
    if request.scope == "video":
        q = q.where(videos.c.id == request.video_id)
    elif owner_scope is not None:
        q = q.where(videos.c.owner_id == owner_scope)
    if request.since is not None:
        q = q.where(videos.c.updated_at >= request.since)
    return list(conn.execute(q.order_by(videos.c.owner_id, videos.c.created_at, videos.c.id)).scalars()), owner_scope


def selected_steps(names: Iterable[str] | None) -> set[str]:
    """The step names that ``names`` (step names or asset keys) select, with everything downstream of them;
    every step for None. Raises ReprocessError naming the valid choices for an unknown one."""
    if names is None:
        return {s.name for s in STEPS}
    by_name = {s.name: s for s in STEPS} | {s.asset_key: s for s in STEPS}
    chosen: set[str] = set()
    for name in names:
        if name not in by_name:
            valid = ", ".join(f"{s.name} ({s.asset_key})" for s in STEPS)
            raise ReprocessError(f"unknown step {name!r}; steps (and their assets): {valid}")
        chosen |= {by_name[name].name} | {s.name for s in downstream(by_name[name].name)}
    if not chosen:
        raise ReprocessError("no step selected; leave steps out to plan every step")
    return chosen


def plan_reprocess(conn: Connection, request: ReprocessRequest, models: dict[str, str]) -> ReprocessPlan:
    """The partitions each asset must redo for ``request``; ``models``: the model identity per step that
    the deployment expects (``heimdex_assets.models.expected_models``).

    Plans follow the graph: a partition a step redoes is redone by the steps downstream of it too
    (photo vectors → query vectors), in the same plan, after it. Steps ``request.steps`` leaves out are
    planned to redo nothing, with ``partitions_left`` saying what they would have redone.
    """
    selected = selected_steps(request.steps)
    video_ids, owner_scope = _scope_videos(conn, request)
    owner_ids: list[uuid.UUID] = []
    if request.scope == "owner":
        owner_ids = [owner_scope]
    elif request.scope == "all" and request.since is None:
        owner_ids = list(conn.execute(text("SELECT id FROM owners ORDER BY created_at, id")).scalars())
    elif request.scope == "all":  # owners whose persons changed since then
        q = select(persons.c.owner_id).distinct().where(persons.c.updated_at >= request.since)
        owner_ids = list(conn.execute(q).scalars())
    wanted_states = {"stale", "missing"} | ({"failed"} if request.retry_failed else set())
    plan = ReprocessPlan(request, owner_scope, len(video_ids), {})
    for step in STEPS:
        ids = video_ids if step.partitioning == "video" else owner_ids
        asset = AssetPlan(step.asset_key, step.version, models[step.name], selected=step.name in selected)
        if ids:
            if request.scope == "all" and request.since is None:  # every READY video / owner: ship no id list
                states = partition_states(conn, step, models)
            else:
                states = partition_states(conn, step, models, partition_ids=ids)
            chosen = {k for k, s in states.items() if request.force or s.state in wanted_states}
            for upstream in step.upstream:
                chosen |= set(plan.assets[step_named(upstream).asset_key].partitions)
            if asset.selected:
                asset.partitions = [k for k in states if k in chosen]
            else:
                asset.partitions_left = len(chosen)
            for s in states.values():
                asset.states[s.state] = asset.states.get(s.state, 0) + 1
            asset.items_stale = sum(s.items if request.force else s.stale_items for s in states.values())
            asset.items_failed = sum(s.failed_items for s in states.values())
            if step.cost_column and asset.model_id in OPENAI_PRICE_PER_MILLION and asset.partitions:
                tokens, exact = _billed_tokens(conn, step, models, states, asset.partitions, request.force)
                plan.estimated_openai_tokens += tokens
                plan.estimate_exact &= exact
                price = OPENAI_PRICE_PER_MILLION[asset.model_id]
                plan.estimated_openai_cost_usd = plan.estimated_openai_tokens / 1e6 * price
        plan.assets[step.asset_key] = asset
    return plan


def estimate_openai(conn: Connection, plan: ReprocessPlan, models: dict[str, str]) -> None:
    """Set the plan's OpenAI estimate anew for the partitions it holds now (after the sensor left out what is in
    flight or not registered, or a stored plan was rebuilt), as ``plan_reprocess`` counts it."""
    plan.estimated_openai_tokens, plan.estimated_openai_cost_usd, plan.estimate_exact = 0, 0.0, True
    for step in STEPS:
        asset = plan.assets.get(step.asset_key)
        if asset is None or not asset.partitions or not step.cost_column:
            continue
        if asset.model_id not in OPENAI_PRICE_PER_MILLION:
            continue
        ids = [uuid.UUID(k) for k in asset.partitions]
        states = partition_states(conn, step, models, partition_ids=ids)
        tokens, exact = _billed_tokens(conn, step, models, states, asset.partitions, plan.request.force)
        plan.estimated_openai_tokens += tokens
        plan.estimated_openai_cost_usd += tokens / 1e6 * OPENAI_PRICE_PER_MILLION[asset.model_id]
        plan.estimate_exact &= exact


def _billed_tokens(
    conn: Connection,
    step: Step,
    models: dict[str, str],
    states: dict[str, PartitionState],
    partition_keys: list[str],
    force: bool,
) -> tuple[int, bool]:
    """Tokens the provider would bill for redoing these partitions of ``step`` and whether all were counted.

    Like a run: the items not done with their current input (all with ``force``), each distinct text once,
    none the cache already holds for the model; failed items waiting for their backoff are counted too (an
    over-estimate). Texts are tokenized up to ``EXACT_TOKEN_BYTES``; the rest of the partitions'
    input bytes (freshness's count) are converted at the ratio measured on the counted ones.
    """
    model_id = models[step.name]
    counted: dict[str, int] = {}  # input identity → tokens
    counted_bytes = 0
    done_keys = 0
    for start in range(0, len(partition_keys), TOKEN_COUNT_BATCH):
        if counted_bytes >= EXACT_TOKEN_BYTES:
            break
        ids = [uuid.UUID(k) for k in partition_keys[start : start + TOKEN_COUNT_BATCH]]
        done = {} if force else step.done_rows(conn, model_id, ids)
        texts = {
            i.input_sha256: str(i.payload[step.cost_column])
            for i in step.items(conn, models, ids)
            if done.get(i.item_id) != i.input_sha256 and i.input_sha256 not in counted
        }
        if step.cached_by_identity and texts:
            cached = conn.execute(
                text("SELECT text_sha256 FROM text_embedding_cache WHERE model_id = :m AND text_sha256 = ANY(:s)"),
                {"m": model_id, "s": list(texts)},
            ).scalars()
            for sha in cached:
                del texts[sha]
        counted |= dict(zip(texts, count_tokens(list(texts.values()), model_id), strict=True))
        counted_bytes += sum(len(t.encode("utf-8")) for t in texts.values())
        done_keys = start + len(ids)
    tokens = sum(counted.values())
    rest_bytes = sum(states[k].input_bytes for k in partition_keys[done_keys:])
    if not rest_bytes:
        return tokens, True
    per_byte = tokens / counted_bytes if counted_bytes else 1 / BYTES_PER_TOKEN_ESTIMATE
    return tokens + math.ceil(rest_bytes * per_byte), False


@dataclass(frozen=True)
class PartitionGroup:
    """Assets of a plan that redo exactly the same partitions of the same partitioning."""

    partitioning: str  # "video" or "owner"
    partitions: list[str]
    asset_keys: list[str]


def _graph_root(name: str) -> str:
    """The most upstream step that ``name`` reads from (itself when it reads no other step)."""
    upstream = step_named(name).upstream
    return _graph_root(upstream[0]) if upstream else name


def partition_groups(plan: ReprocessPlan) -> list[PartitionGroup]:
    """The plan's assets grouped so that one run (or backfill) does them all: assets that redo the same
    partitions share a group, and an asset joins the group of the steps it reads, over the union of
    their partitions, so Dagster runs it after them (photo vectors, then query vectors)."""
    connected: dict[str, list[str]] = {}
    for asset_key, asset in plan.assets.items():
        if asset.partitions:
            connected.setdefault(_graph_root(step_for_asset(asset_key).name), []).append(asset_key)
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for asset_keys in connected.values():
        keys = sorted({k for a in asset_keys for k in plan.assets[a].partitions})
        kind = step_for_asset(asset_keys[0]).partitioning
        groups.setdefault((kind, tuple(keys)), []).extend(asset_keys)
    return [PartitionGroup(kind, list(keys), asset_keys) for (kind, keys), asset_keys in groups.items()]


def plan_tags(plan: ReprocessPlan) -> dict[str, str]:
    """The tags every run of the plan carries: its owner scope (when scoped) and whether it is forced."""
    tags = {}
    if plan.owner_scope is not None:
        tags[OWNER_SCOPE_TAG] = str(plan.owner_scope)
    if plan.request.force:
        tags[FORCE_TAG] = "true"
    if plan.request.retry_failed:
        tags[RETRY_FAILED_TAG] = "true"
    return tags


@dataclass(frozen=True)
class FailedItem:
    """An item a reprocess computed and could not embed, with the reason its run recorded."""

    asset_key: str
    partition: str
    item_id: str
    reason: str


def failed_items(conn: Connection, plan: ReprocessPlan, since: datetime) -> list[FailedItem]:
    """The items of the plan's partitions whose failure was recorded at or after ``since`` (the launch, on the
    database's clock) under the plan's generations: those its runs tried and failed, not those left waiting."""
    out: list[FailedItem] = []
    for asset_key, a in plan.assets.items():
        if not a.partitions:
            continue
        rows = conn.execute(
            text(
                "SELECT partition_id::text, item_id, reason FROM embedding_failures WHERE step = :step "
                "AND step_version = :version AND model_id = :model AND failed_at >= :since "
                "AND partition_id = ANY(CAST(:ids AS uuid[])) ORDER BY partition_id, item_id"
            ),
            {
                "step": step_for_asset(asset_key).name,
                "version": a.step_version,
                "model": a.model_id,
                "since": since,
                "ids": a.partitions,
            },
        )
        out += [FailedItem(asset_key, partition, item_id, reason) for partition, item_id, reason in rows]
    return out


def describe_failed_items(items: list[FailedItem], named: int = 20) -> str:
    """``N item(s) failed: asset item (video …): reason; …`` naming the first ``named``, counting the rest."""
    listed = [
        f"{i.asset_key} item {i.item_id} ({step_for_asset(i.asset_key).partitioning} {i.partition}): "
        f"{i.reason.splitlines()[0][:200]}"
        for i in items[:named]
    ]
    more = f"; and {len(items) - named} more" if len(items) > named else ""
    return f"{len(items)} item(s) failed: {'; '.join(listed)}{more}"


def run_plan(
    plan: ReprocessPlan,
    resources: dict[str, object],
    instance: object,
    on_range_done: Callable[[str, object], None] | None = None,
) -> dict[str, list]:
    """Materialise every asset's partitions in-process (contiguous ranges of at most 50 a run)."""
    from heimdex_assets.assets import DERIVED_ASSETS
    from heimdex_assets.launch import contiguous_ranges, materialize_ranges
    from heimdex_assets.partitions import owners_partitions, videos_partitions

    by_key = {a.key.to_user_string(): a for a in DERIVED_ASSETS}
    tags = plan_tags(plan)
    outcomes: dict[str, list] = {}
    for group in partition_groups(plan):
        keys, asset_keys = group.partitions, group.asset_keys
        partitions_def = videos_partitions if group.partitioning == "video" else owners_partitions
        known = instance.get_dynamic_partitions(partitions_def.name)
        missing = [k for k in keys if k not in set(known)]
        if missing:  # discovery has not run yet for these: register them, as the sensor would
            instance.add_dynamic_partitions(partitions_def.name, missing)
            known = instance.get_dynamic_partitions(partitions_def.name)
        label = ", ".join(asset_keys)
        outcomes[label] = materialize_ranges(
            [by_key[k] for k in asset_keys],
            contiguous_ranges(known, set(keys), 50),
            resources,
            instance,
            tags=tags,
            on_range_done=(lambda o, label=label: on_range_done(label, o)) if on_range_done else None,
        )
    return outcomes
