"""How long freshness (ledger + input stamps) and the stale sensor's plan take on a large corpus.

Builds, with set-based SQL in a database of its own (default: an embedded PostgreSQL on port 55490
under /tmp/heimdex-bench-freshness), owners, READY videos and their scenes, plus persons and photos
for some owners; then makes every step "materialised" without running a model: each step's rows are
written for every item from the step's own ``items_sql`` (its input identity included, vectors of
3 dimensions: freshness never reads them) and one ``partition_ledger`` row per partition as
``runs._write_partition`` writes it (read snapshot taken before the rows, written_xid = the writing
transaction). Then, warm, median of ``--rounds``:

1. ``partition_states`` of every step with no drift (everything fresh);
2. the same after drift (transcripts edited in ``--edits`` videos, ``--deletes`` scenes deleted in other
   videos), each partition's state checked against what the drift must give;
3. ``plan_reprocess(scope="all")`` (what ``stale_partitions_sensor`` does each tick) with its OpenAI
   estimate, then again with another text model configured (a spec bump: every text partition stale);
4. the per-partition write of ``runs._write_partition`` for ``--ledger-partitions`` fresh partitions with
   nothing to compute, split by statement (ledger upsert, deletes, commit).

A query over ``--goal-states-s`` (or a plan over ``--goal-plan-s``) has its slowest statement explained
(EXPLAIN ANALYZE, BUFFERS) in the output. Prints a table, then JSON.

    .venv/bin/python bench/freshness.py --videos 2000 --scenes 20       # smoke test, well under a minute
    .venv/bin/python bench/freshness.py --videos 100000 --scenes 20     # 2M scenes: setup takes minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event, text

from heimdex_assets.db.embedded import EmbeddedPostgres
from heimdex_assets.freshness import partition_states, summarize
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
from heimdex_assets.resources import AppDatabase
from heimdex_assets.runs import LEDGER_UPSERT_SQL, Partitions, StepRun, _write_partition
from heimdex_assets.steps import STEPS, Step
from heimdex_assets.steps import step as step_named

WORK_DIR = Path("/tmp/heimdex-bench-freshness")
ALL_TABLES = (
    "partition_ledger, input_stamps, step_models, owners, videos, scenes, persons, person_reference_photos, "
    "scene_text_vectors, scene_clip_vectors, text_embedding_cache, embedding_failures, scene_person_vectors, "
    "scene_person_scans, person_photo_vectors, person_query_vectors, scene_search_documents"
)
PERSON_MODEL = "clip-bench+detector-bench"
MODELS = {
    "scene_text": "text-embedding-3-small",  # priced: the plan's OpenAI estimate is computed
    "scene_clip": "clip-bench",
    "scene_person": PERSON_MODEL,
    "person_photo": PERSON_MODEL,
    "person_query": PERSON_MODEL,
    "scene_search": "opensearch:bench@x",  # an index identity: freshness only compares ids
}
VECTOR = "'[0.1,0.2,0.3]'::vector"
VIDEO_STEPS = [s.name for s in STEPS if s.partitioning == "video"]
# ~200 characters of speech per scene.
SPEECH = "so the quick brown fox jumps over the lazy dog while the camera pans slowly across the crowded room "

# Source rows, one statement per chunk of videos (scenes in chunks, so that progress shows).
SOURCE_SQL = {
    "owners": """INSERT INTO owners (id, name, created_at)
        SELECT md5('o' || o)::uuid, 'owner ' || o, now() - interval '400 days' + o * interval '1 minute'
        FROM generate_series(1, CAST(:owners AS integer)) o""",
    "videos": """INSERT INTO videos (id, owner_id, title, status, created_at, updated_at)
        SELECT md5('v' || v)::uuid, md5('o' || (v % CAST(:owners AS integer) + 1))::uuid, 'video ' || v, 'READY',
               now() - interval '300 days' + v * interval '1 second', now() - interval '300 days'
        FROM generate_series(1, CAST(:videos AS integer)) v""",
    "scenes": """INSERT INTO scenes (id, video_id, owner_id, scene_index, start_s, end_s, transcript,
                                    visual_description, tags, thumbnail_uri, thumbnail_sha256)
        SELECT md5('s' || v || '/' || i)::uuid, md5('v' || v)::uuid, md5('o' || (v % n.owners + 1))::uuid, i,
               i * 10, i * 10 + 9.5,
               ' scene ' || i || ' of video ' || v || ': ' || substr(repeat(n.speech, 3), 1 + (v + i) % 40, 180) || ' ',
               'a wide shot of room ' || i || ' with ' || (v % 9) || ' people at a table',
               ARRAY['tag' || (i % 7), ' outdoor ', '', 'v' || (v % 13)],
               's3://bench/thumbs/' || v || '/' || i || '.jpg',
               CASE WHEN (v + i) % 20 = 0 THEN NULL ELSE md5('t' || v || '/' || i) || md5('u' || v || '/' || i) END
        FROM (SELECT CAST(:owners AS integer) AS owners, CAST(:speech AS text) AS speech) n,
             generate_series(CAST(:first AS integer), CAST(:last AS integer)) v,
             generate_series(0, CAST(:scenes AS integer) - 1) i""",
    "persons": """INSERT INTO persons (id, owner_id, name)
        SELECT md5('p' || o || '/' || p)::uuid, md5('o' || o)::uuid, 'person ' || p || ' of owner ' || o
        FROM generate_series(1, CAST(:person_owners AS integer)) o, generate_series(1, CAST(:persons AS integer)) p""",
    "photos": """INSERT INTO person_reference_photos (id, person_id, owner_id, uri, sha256, status)
        SELECT md5('f' || o || '/' || p || '/' || f)::uuid, md5('p' || o || '/' || p)::uuid, md5('o' || o)::uuid,
               's3://bench/photos/' || o || '/' || p || '/' || f || '.jpg',
               CASE WHEN f % 2 = 0 THEN md5('F' || o || '/' || p || '/' || f) || md5('G' || f) END, 'READY'
        FROM generate_series(1, CAST(:person_owners AS integer)) o, generate_series(1, CAST(:persons AS integer)) p,
             generate_series(1, CAST(:photos AS integer)) f""",
}

# Each step's rows for every item of its items_sql (alias i), as if its run had computed them.
ROWS_SQL = {
    "scene_text": [
        f"""INSERT INTO scene_text_vectors (scene_id, channel, step_version, video_id, owner_id, model_id,
                                           input_sha256, dimension, embedding)
            SELECT i.scene_id, i.channel, :version, i.partition_id, i.owner_id, :model, i.input_sha256, 3, {VECTOR}
            FROM items i"""
    ],
    "scene_clip": [
        f"""INSERT INTO scene_clip_vectors (scene_id, step_version, video_id, owner_id, model_id, input_sha256,
                                           dimension, embedding)
            SELECT i.scene_id, :version, i.partition_id, i.owner_id, :model, i.input_sha256, 3, {VECTOR}
            FROM items i"""
    ],
    "scene_person": [
        """INSERT INTO scene_person_scans (scene_id, step_version, video_id, owner_id, model_id, input_sha256,
                                          detections)
            SELECT i.scene_id, :version, i.partition_id, i.owner_id, :model, i.input_sha256,
                   CASE WHEN i.uri LIKE '%/0.jpg' THEN 1 ELSE 0 END
            FROM items i""",
        # One person found in the first scene of each video.
        f"""INSERT INTO scene_person_vectors (scene_id, step_version, detection_index, video_id, owner_id, model_id,
                                             input_sha256, detector, box_x, box_y, box_w, box_h, score, dimension,
                                             embedding)
            SELECT i.scene_id, :version, 0, i.partition_id, i.owner_id, :model, i.input_sha256, 'detector-bench',
                   10, 20, 64, 128, 0.9, 3, {VECTOR}
            FROM items i WHERE i.uri LIKE '%/0.jpg'""",
    ],
    "scene_search": [
        """INSERT INTO scene_search_documents (scene_id, step_version, video_id, owner_id, model_id, index_name,
                                              input_sha256)
            SELECT i.scene_id, :version, i.partition_id, i.owner_id, :model, 'heimdex-bench-scenes', i.input_sha256
            FROM items i"""
    ],
    "person_photo": [
        f"""INSERT INTO person_photo_vectors (photo_id, step_version, person_id, owner_id, model_id, input_sha256,
                                             dimension, embedding)
            SELECT i.photo_id, :version, i.person_id, i.owner_id, :model, i.input_sha256, 3, {VECTOR}
            FROM items i"""
    ],
    "person_query": [
        f"""INSERT INTO person_query_vectors (person_id, step_version, owner_id, model_id, input_sha256, photo_count,
                                             dimension, embedding)
            SELECT i.person_id, :version, i.owner_id, :model, i.input_sha256, cardinality(i.photo_ids), 3, {VECTOR}
            FROM items i"""
    ],
}

# The ledger row of every partition with items, as runs._write_partition writes it (no failures);
# the partitions without items get theirs just after.
LEDGER_SQL = """INSERT INTO partition_ledger (step, partition_id, step_version, model_id, owner_id, read_snapshot,
                                   written_xid, items, failed, retry_at, input_bytes, written_at)
    SELECT :step, i.partition_id, :version, :model, min(i.owner_id::text)::uuid, CAST(:snap AS pg_snapshot),
           pg_current_xact_id(), count(*), 0, NULL, {bytes}, now()
    FROM items i GROUP BY i.partition_id"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StatementTimer:
    """Wall time of every statement the engine runs while ``recording`` (no change to what runs)."""

    def __init__(self, engine: Engine) -> None:
        self.recording = False
        self.statements: list[tuple[str, Any, float]] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.recording:
            self.statements.append((statement, parameters, time.perf_counter() - conn.info.pop("bench_t0")))

    @contextmanager
    def record(self) -> Iterator[list[tuple[str, Any, float]]]:
        self.statements, self.recording = [], True
        try:
            yield self.statements
        finally:
            self.recording = False


class CpuClock:
    """CPU seconds of this process plus those of the connection's server backend (when it runs on this
    machine): on a shared machine wall time depends on the neighbours, CPU time much less."""

    def __init__(self, conn: Connection) -> None:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.rollback()  # leave no transaction open behind the caller
        self.stat = Path(f"/proc/{pid}/stat")
        if not self.stat.exists() or "postgres" not in Path(f"/proc/{pid}/comm").read_text():
            self.stat = None  # a remote server: client CPU only
        self.tick = os.sysconf("SC_CLK_TCK")

    def server(self) -> float:
        if self.stat is None:
            return 0.0
        fields = self.stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), self.server()


def median_of(rounds: int, conn: Connection, fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """One warm-up call, then ``rounds`` timed calls: median wall and CPU (client, server) seconds, last result."""
    clock = CpuClock(conn)
    result = fn()
    wall, client, server = [], [], []
    for _ in range(rounds):
        w0, c0, s0 = clock.now()
        result = fn()
        w1, c1, s1 = clock.now()
        wall.append(w1 - w0)
        client.append(c1 - c0)
        server.append(s1 - s0)
    timing = {
        "median_s": round(statistics.median(wall), 3),
        "rounds_s": [round(x, 3) for x in wall],
        "cpu_client_s": round(statistics.median(client), 3),
        "cpu_server_s": round(statistics.median(server), 3) if clock.stat else None,
    }
    return timing, result


def explain(conn: Connection, statement: str, parameters: Any) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of a statement as it ran; long lines (array literals) cut."""
    rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).all()
    return "\n".join(r[0] if len(r[0]) < 300 else r[0][:300] + " ..." for r in rows)


# --- setup ------------------------------------------------------------------------------------------------


def build_sources(db: AppDatabase, args: argparse.Namespace) -> None:
    with db.transaction() as conn:
        conn.execute(text(f"TRUNCATE {ALL_TABLES} CASCADE"))
        conn.execute(text(SOURCE_SQL["owners"]), {"owners": args.owners})
        conn.execute(text(SOURCE_SQL["videos"]), {"owners": args.owners, "videos": args.videos})
    chunk = max(1, 400_000 // args.scenes)  # videos per statement
    for first in range(1, args.videos + 1, chunk):
        last = min(args.videos, first + chunk - 1)
        with db.transaction() as conn:
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            conn.execute(
                text(SOURCE_SQL["scenes"]),
                {"owners": args.owners, "scenes": args.scenes, "first": first, "last": last, "speech": SPEECH},
            )
        log(f"  scenes of videos {first}..{last}")
    with db.transaction() as conn:
        params = {"person_owners": args.person_owners, "persons": args.persons, "photos": args.photos}
        conn.execute(text(SOURCE_SQL["persons"]), params)
        conn.execute(text(SOURCE_SQL["photos"]), params)


def materialise(db: AppDatabase, step: Step) -> int:
    """Rows and ledger of every partition of ``step``, as one run over all of them would leave them."""
    with db.engine.connect() as conn:  # the run's read: its snapshot is taken before its rows are written
        snap = conn.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
        conn.rollback()
    items = step.scoped_items_sql()  # {scope} = '': every item of every partition
    bytes_sql = f"coalesce(sum(octet_length(i.{step.cost_column})), 0)" if step.cost_column else "0"
    params = step.sql_params(MODELS) | {"snap": snap}
    with db.transaction() as conn:
        conn.execute(text("SET LOCAL work_mem = '256MB'"))
        conn.execute(text(f"CREATE TEMP TABLE items ON COMMIT DROP AS {items}"), params)
        for sql in ROWS_SQL[step.name]:
            conn.execute(text(sql), params)
        n = conn.execute(text(LEDGER_SQL.format(bytes=bytes_sql)), params).rowcount
        # A run writes a ledger row for a partition without items too (an owner without persons).
        universe = (
            "SELECT id, owner_id FROM videos WHERE status = 'READY'"
            if step.partitioning == "video"
            else "SELECT id, id AS owner_id FROM owners"
        )
        n += conn.execute(
            text(
                f"""INSERT INTO partition_ledger (step, partition_id, step_version, model_id, owner_id, read_snapshot,
                        written_xid, items, failed, retry_at, input_bytes, written_at)
                    SELECT :step, u.id, :version, :model, u.owner_id, CAST(:snap AS pg_snapshot),
                           pg_current_xact_id(), 0, 0, NULL, 0, now()
                    FROM ({universe}) u ON CONFLICT DO NOTHING"""
            ),
            params,
        ).rowcount
    return n


def build(db: AppDatabase, args: argparse.Namespace) -> dict[str, float]:
    took = {}
    t = time.perf_counter()
    build_sources(db, args)
    took["sources_s"] = time.perf_counter() - t
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) owners, videos, scenes, persons, person_reference_photos, input_stamps"))
    for s in STEPS:  # graph order: person_query reads person_photo's rows
        t = time.perf_counter()
        n = materialise(db, s)
        took[f"{s.name}_s"] = time.perf_counter() - t
        log(f"  {s.name}: rows and {n} ledger rows in {took[f'{s.name}_s']:.1f} s")
    t = time.perf_counter()
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE)"))
    took["vacuum_s"] = time.perf_counter() - t
    return took


# --- drift ------------------------------------------------------------------------------------------------


def drift(db: AppDatabase, args: argparse.Namespace) -> dict[str, set[str]]:
    """Edit one transcript in ``edits`` videos and delete one scene in ``deletes`` other videos, spread over
    the corpus; the partitions each video step must then call stale."""
    with db.transaction() as conn:
        ids = [str(v) for v in conn.execute(text("SELECT id FROM videos ORDER BY created_at, id")).scalars()]
        stride = max(1, len(ids) // (args.edits + args.deletes))
        picked = ids[::stride][: args.edits + args.deletes]
        edited, deleted = picked[: args.edits], picked[args.edits :]
        n_edit = conn.execute(
            text(
                "UPDATE scenes SET transcript = transcript || ' (corrected)' "
                "WHERE scene_index = :i AND video_id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"i": min(3, args.scenes - 1), "ids": edited},
        ).rowcount
        n_del = conn.execute(
            text("DELETE FROM scenes WHERE scene_index = :i AND video_id = ANY(CAST(:ids AS uuid[]))"),
            {"i": args.scenes // 2, "ids": deleted},
        ).rowcount
    log(f"  drift: {n_edit} transcripts edited, {n_del} scenes deleted")
    stale_text = set(edited) | set(deleted)  # an edited transcript changes the text item and the search document
    return {
        "scene_text": stale_text,
        "scene_search": stale_text,
        "scene_clip": set(deleted),
        "scene_person": set(deleted),
    }


# --- measurements -----------------------------------------------------------------------------------------


def time_states(
    db: AppDatabase, timer: StatementTimer, args: argparse.Namespace, expected: dict[str, set[str]] | None
) -> dict[str, dict[str, Any]]:
    """partition_states of every step: median time, states, the check, and the slowest statement."""
    out = {}
    for s in STEPS:
        with db.engine.connect() as conn:
            with timer.record() as statements:
                timing, states = median_of(args.rounds, conn, lambda s=s, conn=conn: partition_states(conn, s, MODELS))
            per_round = len(statements) // (args.rounds + 1)
            last = statements[-per_round:] if per_round else []
            sql_s = sum(x[2] for x in last)
            slowest = max(last, key=lambda x: x[2]) if last else None
            stale = {k for k, v in states.items() if v.state == "stale"}
            want = (expected or {}).get(s.name, set())
            others = Counter(v.state for k, v in states.items() if v.state != "stale")
            ok = stale == want and set(others) <= {"fresh"}
            wrong = f"stale {len(stale)} (missing {len(want - stale)}, unexpected {len(stale - want)}), {dict(others)}"
            row: dict[str, Any] = {
                **timing,
                "sql_s": round(sql_s, 3),
                "statements": per_round,
                "partitions": len(states),
                "states": summarize(states),
                "expected_stale": len(want),
                "check": "ok" if ok else "WRONG: " + wrong,
            }
            if timing["median_s"] > args.goal_states_s and slowest is not None:
                row["slowest_statement_s"] = round(slowest[2], 3)
                row["explain"] = explain(conn, slowest[0], slowest[1])
            out[s.name] = row
    return out


def time_plan(db: AppDatabase, timer: StatementTimer, args: argparse.Namespace, models: dict[str, str]) -> dict:
    with db.engine.connect() as conn:
        with timer.record() as statements:
            timing, plan = median_of(
                args.rounds, conn, lambda: plan_reprocess(conn, ReprocessRequest(scope="all"), models)
            )
        per_round = len(statements) // (args.rounds + 1)
        last = statements[-per_round:]
        out = {
            **timing,
            "sql_s": round(sum(x[2] for x in last), 3),
            "statements": per_round,
            "estimated_openai_tokens": plan.estimated_openai_tokens,
            "estimated_openai_cost_usd": round(plan.estimated_openai_cost_usd, 6),
            "partitions": {k: len(a.partitions) for k, a in plan.assets.items()},
            "items_stale": {k: a.items_stale for k, a in plan.assets.items()},
        }
        slow = sorted(last, key=lambda x: -x[2])[:3]
        out["slowest_statements_s"] = [round(x[2], 3) for x in slow]
        if timing["median_s"] > args.goal_plan_s and slow:
            out["explain"] = explain(conn, slow[0][0], slow[0][1])
    return out


def statement_kind(sql: str) -> str:
    words = " ".join(sql.split()[:3]).lower()
    if "partition_ledger" in sql[:80]:
        return "ledger upsert"
    if words.startswith("delete from embedding_failures"):
        return "failures delete"
    if words.startswith("delete from"):
        return "rows delete (" + sql.split()[2] + ")"
    if words.startswith("insert into embedding_failures"):
        return "failures insert"
    return "other: " + " ".join(sql.split()[:4])


def time_ledger_writes(
    db: AppDatabase, timer: StatementTimer, args: argparse.Namespace, skip: set[str], step: Step
) -> dict[str, Any]:
    """runs._write_partition, one transaction per partition, for fresh partitions with nothing to compute
    (as run_step does after its read), split by statement; then the ledger upsert alone."""
    model = MODELS[step.name]
    read = db.engine.connect().execution_options(isolation_level="REPEATABLE READ")
    with read, read.begin():  # run_step's read: snapshot, then the items of the run's partitions
        snapshot = read.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
        ids = [
            pid
            for pid in read.execute(text("SELECT id FROM videos WHERE status = 'READY' ORDER BY id")).scalars()
            if str(pid) not in skip
        ][: args.ledger_partitions]
        t = time.perf_counter()
        items = step.items(read, MODELS, ids)
        items_s = time.perf_counter() - t
    by_partition: dict[uuid.UUID, list] = {p: [] for p in ids}
    for i in items:
        by_partition[i.partition_id].append(i)
    result = StepRun(step, model, Partitions(ids=list(ids)))
    body, commit = [], []
    with db.engine.connect() as conn:  # one transaction per partition, as run_step's db.transaction()
        clock = CpuClock(conn)
        start = clock.now()
        with timer.record() as statements:
            for pid in ids:
                t0 = time.perf_counter()
                with conn.begin():
                    _write_partition(conn, step, model, pid, snapshot, by_partition[pid], set(), {}, result)
                    t1 = time.perf_counter()
                body.append(t1 - t0)
                commit.append(time.perf_counter() - t1)
        end = clock.now()
        # The ledger upsert alone, each in its own transaction (its statement + commit).
        alone = []
        for pid in ids:
            part = by_partition[pid]
            cost = step.cost_column
            params = {
                "step": step.name,
                "p": pid,
                "version": step.version,
                "model": model,
                "owner": part[0].owner_id,
                "snap": snapshot,
                "items": len(part),
                "bytes": sum(len(str(i.payload.get(cost) or "").encode()) for i in part) if cost else 0,
                "current": [i.item_id for i in part],
            }
            t = time.perf_counter()
            with conn.begin():
                conn.execute(text(LEDGER_UPSERT_SQL), params)
            alone.append(time.perf_counter() - t)
    per_kind: dict[str, float] = {}
    for sql, _, sec in statements:
        kind = statement_kind(sql)
        per_kind[kind] = per_kind.get(kind, 0.0) + sec
    total = sum(body) + sum(commit)
    n = len(ids)
    ms = 1000 / n
    return {
        "step": step.name,
        "partitions": n,
        "items": len(items),
        "items_read_s": round(items_s, 3),
        "rows_written": result.rows_written,
        "stray_rows_deleted": result.stray_rows_deleted,
        "per_partition_ms": round(total * ms, 3),
        "per_partition_median_ms": round(statistics.median(b + c for b, c in zip(body, commit, strict=True)) * 1000, 3),
        "cpu_client_ms": round((end[1] - start[1]) * ms, 3),
        "cpu_server_ms": round((end[2] - start[2]) * ms, 3) if clock.stat else None,
        "commit_ms": round(sum(commit) * ms, 3),
        "statements_ms": {k: round(v * ms, 3) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "ledger_upsert_share": round(per_kind.get("ledger upsert", 0.0) / total, 3),
        "ledger_upsert_alone_with_commit_ms": round(sum(alone) * ms, 3),
    }


# --- main -------------------------------------------------------------------------------------------------


def open_server(args: argparse.Namespace) -> tuple[str, EmbeddedPostgres | None]:
    if args.database_url:
        return args.database_url, None
    server = EmbeddedPostgres(data_dir=args.work_dir / "postgres", port=args.pg_port, database=args.database)
    return server.ensure_running(), server


def refuse_foreign_data(db: AppDatabase, args: argparse.Namespace) -> None:
    """The bench empties every table: on a server it did not start, only with --truncate."""
    with db.engine.connect() as conn:
        has_data = conn.execute(text("SELECT EXISTS (SELECT 1 FROM owners)")).scalar_one()
    if has_data and args.database_url and not args.truncate:
        raise SystemExit(f"{db.describe()} holds data; the bench empties every table: pass --truncate to allow it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--scenes", type=int, default=20, help="scenes per video")
    parser.add_argument("--owners", type=int, default=500)
    parser.add_argument("--person-owners", type=int, default=50, help="owners with persons and photos")
    parser.add_argument("--persons", type=int, default=4, help="persons per such owner")
    parser.add_argument("--photos", type=int, default=3, help="photos per person")
    parser.add_argument("--edits", type=int, default=100, help="videos with an edited transcript")
    parser.add_argument("--deletes", type=int, default=20, help="videos with a deleted scene")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up); median counts")
    parser.add_argument("--ledger-partitions", type=int, default=500)
    parser.add_argument("--ledger-step", default="scene_text")
    parser.add_argument("--goal-states-s", type=float, default=1.0)
    parser.add_argument("--goal-plan-s", type=float, default=10.0)
    parser.add_argument("--database-url", help="use this server (every table is emptied) instead of an embedded one")
    parser.add_argument("--truncate", action="store_true", help="allow emptying a --database-url that holds data")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    parser.add_argument("--pg-port", type=int, default=55490)
    parser.add_argument("--database", default="heimdex_bench")
    parser.add_argument("--keep-server", action="store_true", help="leave the embedded server running (to explore)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    running = args.database_url is None and EmbeddedPostgres(args.work_dir / "postgres", args.pg_port).is_ready()
    url, server = open_server(args)
    stop_after = server is not None and not running and not args.keep_server  # leave the machine as found
    db = AppDatabase(url=url)
    timer = StatementTimer(db.engine)
    report: dict[str, Any] = {
        "videos": args.videos,
        "scenes": args.videos * args.scenes,
        "owners": args.owners,
        "person_owners": args.person_owners,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "database": db.describe(),
        "load_avg_start": round(os.getloadavg()[0], 2),
    }
    try:
        refuse_foreign_data(db, args)
        log(f"building {args.videos} videos x {args.scenes} scenes in {db.describe()}")
        t = time.perf_counter()
        report["build"] = {k: round(v, 1) for k, v in build(db, args).items()}
        report["build_s"] = round(time.perf_counter() - t, 1)
        with db.engine.connect() as conn:
            report["sizes"] = dict(
                conn.execute(
                    text(
                        "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
                        "WHERE relname IN ('scenes', 'scene_text_vectors', 'partition_ledger', 'input_stamps') "
                        "ORDER BY relname"
                    )
                ).all()
            )
        log("timing partition_states, no drift")
        report["states_no_drift"] = time_states(db, timer, args, {})
        expected = drift(db, args)
        log("timing partition_states after drift")
        report["states_drift"] = time_states(db, timer, args, expected)
        log("timing plan_reprocess (the stale sensor's plan)")
        report["plan"] = time_plan(db, timer, args, MODELS)
        log("timing plan_reprocess after a text model change (every text partition stale)")
        report["plan_model_bump"] = time_plan(db, timer, args, MODELS | {"scene_text": "text-embedding-3-large"})
        log(f"timing runs._write_partition for {args.ledger_partitions} partitions of {args.ledger_step}")
        skip = set().union(*expected.values())
        report["ledger_write"] = time_ledger_writes(db, timer, args, skip, step_named(args.ledger_step))
        with db.engine.connect() as conn:  # the partitions just written are still exactly as they were
            after = partition_states(conn, step_named(args.ledger_step), MODELS)
        report["ledger_write"]["states_after"] = summarize(after)
    finally:
        if stop_after and server is not None:
            server.stop()
    report["load_avg_end"] = round(os.getloadavg()[0], 2)
    print_report(report, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


def print_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"{r['videos']} READY videos x {args.scenes} scenes = {r['scenes']} scenes, {r['owners']} owners "
        f"({r['person_owners']} with persons); built in {r['build_s']} s; {r['machine']}; "
        f"load average {r['load_avg_start']} at start, {r['load_avg_end']} at end"
    )
    print(f"  build: {r['build']}  sizes: {r['sizes']}")
    print()
    print(f"partition_states, median of {args.rounds} warm rounds (goal <= {args.goal_states_s} s wall)")
    print(f"  {'step':<14}{'case':<10}{'wall s':>8}{'cpu py':>8}{'cpu pg':>8}{'sql s':>8}  {'states':<44}check")
    for case in ("states_no_drift", "states_drift"):
        for name, x in r[case].items():
            states = " ".join(f"{k}={v}" for k, v in x["states"].items())
            label = "no drift" if case == "states_no_drift" else "drift"
            slow = "  SLOW" if x["median_s"] > args.goal_states_s else ""
            print(
                f"  {name:<14}{label:<10}{x['median_s']:>8.3f}{x['cpu_client_s']:>8.3f}{x['cpu_server_s'] or 0:>8.3f}"
                f"{x['sql_s']:>8.3f}  {states:<44}{x['check']}{slow}"
            )
    print("  (wall: median seconds; cpu py / cpu pg: CPU seconds of this process / of its server backend;")
    print("   sql: time inside cursor.execute, i.e. server work plus the transfer of the rows)")
    print()
    print(f"plan_reprocess(scope='all'), median of {args.rounds} (goal < {args.goal_plan_s} s wall)")
    for case, label in (("plan", "drift"), ("plan_model_bump", "text model bump")):
        x = r[case]
        parts = " ".join(f"{k.rsplit('_', 1)[0]}={v}" for k, v in x["partitions"].items())
        print(
            f"  {label:<16}{x['median_s']:>7.3f} s wall (cpu py {x['cpu_client_s']:.3f}, "
            f"pg {x['cpu_server_s'] or 0:.3f}; sql {x['sql_s']:.3f} s in {x['statements']} statements)  "
            f"${x['estimated_openai_cost_usd']:.4f} ({x['estimated_openai_tokens']} tokens)"
        )
        print(f"  {'':<16}partitions: {parts}")
    x = r["ledger_write"]
    print()
    print(f"runs._write_partition, {x['partitions']} partitions of {x['step']} ({x['items']} items, none to compute)")
    print(
        f"  {x['per_partition_ms']:.2f} ms per partition (median {x['per_partition_median_ms']:.2f}; cpu py "
        f"{x['cpu_client_ms']:.2f}, pg {x['cpu_server_ms'] or 0:.2f}), "
        f"commit {x['commit_ms']:.2f} ms; ledger upsert {x['ledger_upsert_share']:.0%} of it; "
        f"upsert alone in its own transaction {x['ledger_upsert_alone_with_commit_ms']:.2f} ms"
    )
    print(
        f"  per statement (ms/partition): {x['statements_ms']}; items read {x['items_read_s']} s; "
        f"states after: {x['states_after']}"
    )
    for case in ("states_no_drift", "states_drift", "plan", "plan_model_bump"):
        for name, x in r[case].items() if case.startswith("states") else [(case, r[case])]:
            if "explain" in x:
                print(f"\nEXPLAIN (ANALYZE, BUFFERS) of the slowest statement: {case} {name}\n{x['explain']}")
    print()
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
