"""The frame every asset shares: a run's partitions → its step's items → compute → one transaction
per partition (rows, failures, ledger) → metadata. An asset passes in only how to compute items.

- Items come from the step's definition (``heimdex_assets.steps``), read in one REPEATABLE READ
  transaction whose snapshot the ledger keeps: an input changed after that read leaves the
  partition stale, whatever the run then writes.
- Only items without a row of their current identity are computed (all with ``force``); an item
  that failed on its current input waits for its backoff (``retry_failed`` overrides).
- Each partition is written in its own transaction: its rows become exactly the items' rows
  (stray rows go), its failures exactly the failing items, its ledger what was read. A crash
  leaves a partition old or new, never a mix; a partition that cannot be written (or whose video was
  deleted during the run) fails alone, named in the run's failure once the others are written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from sqlalchemy import Connection, or_, select, text
from sqlalchemy.dialects.postgresql import insert

from heimdex_assets.db.tables import owners, videos
from heimdex_assets.freshness import FAILURE_BACKOFF_BASE, FAILURE_BACKOFF_CAP
from heimdex_assets.generations import AutoActivation, Generation, activate_if_complete
from heimdex_assets.models import ModelMismatchError, deployment_models, require_model
from heimdex_assets.partitions import InvalidIdError, parse_partition_key
from heimdex_assets.resources import AppDatabase
from heimdex_assets.resources.text_embedder import EmbeddingProviderError
from heimdex_assets.steps import Item, Step

# Run tags understood by the assets; launchers (sensor, CLI, API) set them.
OWNER_SCOPE_TAG = "heimdex/owner_id"
FORCE_TAG = "heimdex/force"
RETRY_FAILED_TAG = "heimdex/retry_failed"
# A partition's ledger row: what the run read (its snapshot) and found, its own transaction, and the
# failures now recorded for the partition's items.
LEDGER_UPSERT_SQL = """INSERT INTO partition_ledger AS l (step, partition_id, step_version, model_id, owner_id,
       read_snapshot, written_xid, items, failed, retry_at, input_bytes, written_at)
   SELECT :step, :p, :version, :model, :owner, CAST(:snap AS pg_snapshot), pg_current_xact_id(), :items,
          count(*), min(retry_at), :bytes, now()
   FROM embedding_failures WHERE step = :step AND partition_id = :p AND step_version = :version
        AND model_id = :model AND item_id = ANY(:current)
   ON CONFLICT (step, partition_id, step_version, model_id) DO UPDATE SET
       owner_id = EXCLUDED.owner_id, read_snapshot = EXCLUDED.read_snapshot,
       written_xid = EXCLUDED.written_xid, items = EXCLUDED.items,
       failed = EXCLUDED.failed, retry_at = EXCLUDED.retry_at, input_bytes = EXCLUDED.input_bytes,
       written_at = now()"""
# PostgreSQL array types of the key columns' SQLAlchemy types, to pass a batch of keys as arrays.
_SQL_ARRAY = {"Uuid": "uuid[]", "Text": "text[]", "Integer": "integer[]"}


def run_flag(context: dg.AssetExecutionContext, tag: str) -> bool:
    """Whether the run carries ``tag`` set to true."""
    return str(context.run.tags.get(tag, "")).lower() in ("1", "true", "yes")


@dataclass
class Partitions:
    """A run's partition keys resolved: the ids to process, and the keys left out and why."""

    ids: list[uuid.UUID] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def resolve_partitions(
    conn: Connection, partitioning: str, keys: Sequence[str], owner_scope: str | None = None
) -> Partitions:
    """Validate keys against the app tables and the run's owner scope; a video that is not READY is
    skipped (it has no items), an unknown or out-of-scope key rejected."""
    out = Partitions()
    what = "video id" if partitioning == "video" else "owner id"
    ids: dict[uuid.UUID, str] = {}
    for key in keys:
        try:
            ids[parse_partition_key(key, what)] = key
        except InvalidIdError as exc:
            out.rejected[key] = str(exc)
    scope = uuid.UUID(owner_scope) if owner_scope else None
    table = videos if partitioning == "video" else owners
    cols = (table.c.id, table.c.owner_id, table.c.status) if partitioning == "video" else (table.c.id, table.c.id)
    found = {r[0]: r for r in conn.execute(table.select().with_only_columns(*cols).where(table.c.id.in_(list(ids))))}
    for pid, key in ids.items():
        row = found.get(pid)
        if row is None:
            out.rejected[key] = f"unknown {what.split()[0]} {key}"
        elif scope is not None and row[1] != scope:
            out.rejected[key] = f"{what.split()[0]} {key} is not in the scope of owner {scope}"
        elif partitioning == "video" and row[2] != "READY":
            out.skipped[key] = f"video {key} is {row[2]}, not READY: skipped"
        else:
            out.ids.append(pid)
    out.ids.sort()
    return out


def raise_for_rejected(rejected: dict[str, str]) -> None:
    """A dg.Failure listing every rejected partition key with its reason (nothing when none)."""
    if rejected:
        listed = "; ".join(f"{k}: {why}" for k, why in sorted(rejected.items()))
        # Not for a step retry (RetryPolicy): a bad, foreign or deleted key fails alike; the others are written.
        raise dg.Failure(
            description=f"{len(rejected)} partition(s) could not be processed: {listed}", allow_retries=False
        )


@dataclass
class ItemOutput:
    """What computing one item gave: its rows per table (generation columns are added), or why not."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Batch:
    """What an asset computes: the run's items, and those to (re)compute now."""

    items: list[Item]
    todo: list[Item]
    partition_ids: list[uuid.UUID]
    force: bool


@dataclass
class StepRun:
    """What a run of a step did, for the asset's metadata and logs."""

    step: Step
    model_id: str
    partitions: Partitions
    items: int = 0
    computed: int = 0
    unchanged: int = 0
    waiting: int = 0  # failed items in their backoff, not retried
    rows_written: int = 0
    stray_rows_deleted: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    activation: AutoActivation | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def activated(self) -> Generation | None:
        """The generation this run made active (it completed the candidate and the gate passed)."""
        return self.activation.activated if self.activation is not None else None

    def _gate(self) -> dict[str, Any]:
        a = self.activation
        if a is None:
            return {}
        return {"activated": a.activated is not None, "why_not": a.why_not, "evaluation": a.evaluation}

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """The materialisation metadata every step reports, plus ``extra``."""
        return {
            "partitions": len(self.partitions.ids),
            "partitions_skipped": dg.MetadataValue.json(self.partitions.skipped),
            "items": self.items,
            "items_computed": self.computed,
            "items_unchanged": self.unchanged,
            "items_waiting_for_retry": self.waiting,
            "rows_written": self.rows_written,
            "stray_rows_deleted": self.stray_rows_deleted,
            "failures": len(self.failures),
            "failure_reasons": dg.MetadataValue.json(dict(list(self.failures.items())[:50])),
            "step_version": self.step.version,
            "model_id": self.model_id,
            "activated_generation": f"{self.activated.version} / {self.activated.model_id}" if self.activated else "",
            "generation_gate": dg.MetadataValue.json(self._gate()),
            **extra,
            "seconds": round(time.monotonic() - self.started, 3),
        }


PartitionWriter = Callable[[Connection, uuid.UUID, list[Item], dict[str, ItemOutput], dict[str, str]], None]


def run_step(
    context: dg.AssetExecutionContext,
    db: AppDatabase,
    step: Step,
    models: dict[str, str],
    compute: Callable[[Batch], dict[str, ItemOutput]],
    *,
    write_partition: PartitionWriter | None = None,
    gate_resources: Mapping[str, Any] | None = None,
) -> StepRun:
    """Run ``step`` over the run's partitions. ``models``: this worker's model identity of the step (and
    of its upstream steps); ``compute`` turns the batch's ``todo`` items into outputs by item id;
    ``write_partition(conn, partition_id, items, outputs, failures)`` adds step-specific writes to a
    partition's transaction; ``gate_resources``: the models the evaluation gate (``evaluation.py``) embeds
    queries with before the automatic flip. Raises dg.Failure, after writing the good partitions, naming
    the bad ones."""
    model_id = models[step.name]
    force = run_flag(context, FORCE_TAG)
    retry_failed = run_flag(context, RETRY_FAILED_TAG)
    worker = f"run {context.run.run_id[:8]}"
    try:  # before any work: a worker of another model than the deployment's does nothing
        with db.transaction() as conn:
            require_model(conn, step.name, model_id, worker)
    except ModelMismatchError as exc:  # a worker of another model fails alike on a step retry
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    read = db.engine.connect().execution_options(isolation_level="REPEATABLE READ")
    with read, read.begin():
        # The snapshot every read below sees, kept in the ledger (the first statement fixes it).
        snapshot = read.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
        parts = resolve_partitions(
            read, step.partitioning, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG)
        )
        result = StepRun(step, model_id, parts)
        items = step.items(read, deployment_models(read, models), parts.ids)
        done = step.done_rows(read, model_id, parts.ids)
        waiting = {} if retry_failed else _failures_in_backoff(read, step, model_id, parts.ids)
    for why in parts.skipped.values():
        context.log.info(why)

    todo = [
        i
        for i in items
        if (force or done.get(i.item_id) != i.input_sha256) and waiting.get(i.item_id) != i.input_sha256
    ]
    result.items, result.computed = len(items), len(todo)
    result.waiting = sum(1 for i in items if waiting.get(i.item_id) == i.input_sha256 and done.get(i.item_id) is None)
    result.unchanged = len(items) - len(todo) - result.waiting
    try:
        outputs = compute(Batch(items, todo, parts.ids, force))  # also with nothing to do: strays may go
    except EmbeddingProviderError as exc:  # no key, 401/403/404: a misconfigured provider fails alike on a retry
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    for i in todo:
        out = outputs.setdefault(i.item_id, ItemOutput(error="not computed"))
        if out.error is not None:
            result.failures[i.item_id] = out.error

    by_partition: dict[uuid.UUID, list[Item]] = {p: [] for p in parts.ids}
    for i in items:
        by_partition[i.partition_id].append(i)
    todo_ids = {i.item_id for i in todo}
    for pid in parts.ids:
        try:
            with db.transaction() as conn:  # one transaction per partition: old state or new, never a mix
                require_model(conn, step.name, model_id, worker)
                if not _hold_partition(conn, step, pid):
                    parts.rejected[str(pid)] = f"{step.partitioning} {pid} was deleted during the run: nothing written"
                    continue
                _write_partition(conn, step, model_id, pid, snapshot, by_partition[pid], todo_ids, outputs, result)
                if write_partition is not None:
                    part_outputs = {i.item_id: outputs[i.item_id] for i in by_partition[pid] if i.item_id in outputs}
                    write_partition(conn, pid, by_partition[pid], part_outputs, result.failures)
        except ModelMismatchError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None
        except Exception as exc:  # one partition that cannot be written does not sink the others
            parts.rejected[str(pid)] = f"not written: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    for item_id, reason in result.failures.items():
        context.log.warning(f"{step.name} item {item_id}: {reason}")
    with db.transaction() as conn:  # the candidate serves search once it covers every partition
        result.activation = activate_if_complete(
            conn, step, deployment_models(conn, models), f"run {context.run.run_id}", gate_resources
        )
    if result.activated is not None:
        context.log.info(f"{step.name}: generation {step.version} / {model_id} is now active")
    elif result.activation.evaluation is not None:
        context.log.warning(
            f"{step.name}: generation {step.version} / {model_id} not active: {result.activation.why_not}"
        )
    return result


def _hold_partition(conn: Connection, step: Step, pid: uuid.UUID) -> bool:
    """Whether the partition's video (or owner) still exists, key-share locked until the caller commits. One
    deleted during the run gets no rows, failures or ledger; a delete from now on waits for this write, whose
    rows then go with their scenes (foreign keys) and whose ledger the discovery sensor removes."""
    table = videos if step.partitioning == "video" else owners
    return conn.execute(select(table.c.id).where(table.c.id == pid).with_for_update(key_share=True)).first() is not None


def _failures_in_backoff(conn: Connection, step: Step, model_id: str, ids: list[uuid.UUID]) -> dict[str, str]:
    """item_id → input identity of the items whose failure still waits for its backoff."""
    rows = conn.execute(
        text(
            "SELECT item_id, input_sha256 FROM embedding_failures WHERE step = :step AND partition_id = ANY(:ids) "
            "AND step_version = :version AND model_id = :model AND retry_at > now()"
        ),
        {"step": step.name, "ids": ids, "version": step.version, "model": model_id},
    )
    return {r.item_id: r.input_sha256 for r in rows}


def _write_partition(
    conn: Connection,
    step: Step,
    model_id: str,
    pid: uuid.UUID,
    snapshot: str,
    items: list[Item],
    todo_ids: set[str],
    outputs: dict[str, ItemOutput],
    result: StepRun,
) -> None:
    """Rows, failures and ledger of one partition, in the caller's transaction."""
    pcol = step.row_partition_column
    gen = {"p": pid, "version": step.version, "model": model_id}
    ok = [i for i in items if i.item_id not in todo_ids or outputs[i.item_id].error is None]
    kept = [i.item_id for i in ok if i.item_id not in todo_ids]
    for table in (step.table, *step.extra_tables):
        rows = [
            {
                **row,
                "step_version": step.version,
                "model_id": model_id,
                "input_sha256": i.input_sha256,
                "owner_id": i.owner_id,
                pcol: i.partition_id,
            }
            for i in ok
            if i.item_id in todo_ids
            for row in outputs[i.item_id].rows.get(table.name, [])
        ]
        key = [c.name for c in table.primary_key.columns]
        # Every row of this generation goes but those of items kept as they were and those written
        # now: strays, and the extra rows of a recomputed item (a thumbnail with fewer people).
        written = ", ".join(f"CAST(:k{n} AS {_SQL_ARRAY[type(table.c[c].type).__name__]})" for n, c in enumerate(key))
        deleted = conn.execute(
            text(
                f"DELETE FROM {table.name} r WHERE r.{pcol} = :p AND r.step_version = :version "
                f"AND r.model_id = :model AND NOT ({step.item_key} = ANY(:kept)) "
                f"AND ({', '.join('r.' + c for c in key)}) NOT IN (SELECT * FROM unnest({written}))"
            ),
            gen | {"kept": kept} | {f"k{n}": [r[c] for r in rows] for n, c in enumerate(key)},
        ).rowcount
        if table is step.table:
            result.stray_rows_deleted += deleted
        if rows:
            # Equal rows stay untouched (their created_at too): running twice, forced or not, changes nothing.
            stmt = insert(table)
            compared = [c for c in rows[0] if c not in key]
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=key,
                    set_={c: stmt.excluded[c] for c in compared},
                    where=or_(*(table.c[c].is_distinct_from(stmt.excluded[c]) for c in compared)),
                ),
                rows,
            )
            result.rows_written += len(rows)

    failed = [i for i in items if i.item_id in todo_ids and outputs[i.item_id].error is not None]
    # Failures of this generation not repeated now (item done, gone, or changed) are forgotten;
    # those still waiting for their backoff stay as they are.
    conn.execute(
        text(
            "DELETE FROM embedding_failures WHERE step = :step AND partition_id = :p AND step_version = :version "
            "AND model_id = :model AND (item_id = ANY(:now_ok) OR NOT item_id = ANY(:current))"
        ),
        gen
        | {
            "step": step.name,
            "now_ok": [i.item_id for i in ok if i.item_id in todo_ids],
            "current": [i.item_id for i in items],
        },
    )
    if failed:
        conn.execute(
            text(
                """INSERT INTO embedding_failures AS f (step, item_id, step_version, model_id, partition_id, video_id,
                       owner_id, input_sha256, reason, attempts, failed_at, retry_at)
                   VALUES (:step, :item_id, :version, :model, :p, :video_id, :owner_id, :sha, :reason, 1, now(),
                       now() + :base)
                   ON CONFLICT (step, item_id, step_version, model_id) DO UPDATE SET
                       input_sha256 = EXCLUDED.input_sha256, reason = EXCLUDED.reason, failed_at = now(),
                       attempts = CASE WHEN f.input_sha256 = EXCLUDED.input_sha256 THEN f.attempts + 1 ELSE 1 END,
                       retry_at = now() + CASE WHEN f.input_sha256 = EXCLUDED.input_sha256
                           THEN least(:cap, :base * power(2, least(f.attempts, 20))) ELSE :base END"""
            ),
            [
                gen
                | {
                    "step": step.name,
                    "item_id": i.item_id,
                    "sha": i.input_sha256,
                    "owner_id": i.owner_id,
                    "video_id": pid if step.partitioning == "video" else None,
                    "reason": outputs[i.item_id].error[:2000],
                    "base": FAILURE_BACKOFF_BASE,
                    "cap": FAILURE_BACKOFF_CAP,
                }
                for i in failed
            ],
        )
    input_bytes = (
        sum(len(str(i.payload.get(step.cost_column) or "").encode()) for i in items) if step.cost_column else 0
    )
    owner_id = items[0].owner_id if items else (pid if step.partitioning == "owner" else _video_owner(conn, pid))
    conn.execute(
        text(LEDGER_UPSERT_SQL),
        gen
        | {
            "step": step.name,
            "owner": owner_id,
            "snap": snapshot,
            "items": len(items),
            "bytes": input_bytes,
            "current": [i.item_id for i in items],
        },
    )


def _video_owner(conn: Connection, video_id: uuid.UUID) -> uuid.UUID:
    return conn.execute(text("SELECT owner_id FROM videos WHERE id = :v"), {"v": video_id}).scalar_one()
