"""Benchmark: search latency while a backfill writes the next generation of scene text vectors, against idle.

One run, one searching thread, on a private embedded PostgreSQL (port 55503 under /tmp/heimdex-bench-cutover,
its tables emptied first):

1. seed: ``--videos`` READY videos over ``--owners`` owners, ``--scenes`` scenes each; transcripts and visual
   descriptions are composed from the demo corpus's topics (its sentences, shots, speakers), so that almost
   every text is distinct and each owner has three topics of its own;
2. generation 1: ``scene_text_embeddings`` (and ``scene_search_index`` in SQLite FTS5, or OpenSearch with
   ``--opensearch-url``, for hybrid search) materialised for every video with the local MiniLM model, in
   ranges of 50 partitions (``materialize_ranges``, as ``heimdex reprocess --sync`` runs them); it becomes
   active at the end of the last run. MiniLM vectors are saved under the work dir and put back in the emptied
   text cache by the next run (``--cold``: not), so that only the first run pays the model;
3. the deployment moves to ``--new-model`` (``record_models``, as ``heimdex models use`` does): an OpenAI
   model answered by the local stand-in ``heimdex_assets_tests/fake_openai.py``, in a process of its own,
   reached through the real ``openai`` client. The searcher is configured for the new model, as an API
   process is after the move: until the flip it embeds queries with MiniLM in NumPy (``search.query_embedder``);
4. idle before: ``--idle-searches`` searches per mode (``search_scenes`` in-process, embedders loaded once),
   cycling over (owner, query) pairs; every pair's results are kept;
5. during: a subprocess backfills generation 2 with the real asset (``scene_text_embeddings`` over every
   video, ranges of 50) while the same thread searches continuously; the generation flips by itself at the
   end of the backfill's last run (``runs.run_step`` -> ``activate_if_complete``, after its evaluation gate).
   ``--pause-every S`` stops the backfill (SIGSTOP) for S seconds every S seconds: searches made while it is
   stopped are idle samples under the same background load as the searches beside it;
6. checks: the active generation flipped exactly once, to the new model; every search before the flip
   returned exactly its pair's idle results, every search after it the new generation's;
7. idle after: a rollback to generation 1 (``generations.rollback``), the idle searches again; they must
   return the idle results again. Idle figures pool before and after: the machine may be shared.

``--backfill-nice 0,10`` runs steps 4-7 once per value (the backfill and the stand-in API at that nice level),
generation 2's rows and cached vectors pruned between rounds. The searcher's BLAS is limited to one thread
by default (``--query-blas-threads 0``: unlimited, as the API runs today; see bench/README.md for why).

Prints, per round and mode, p50/p95/p99/max idle and during (the searches that read the old generation while
the backfill's runs ran), p95 during / p95 idle against the target 1.2, the time inside and outside
PostgreSQL, the backfill's rate and where the CPU went in each phase (this process, PostgreSQL for the
searcher and for the rest, the backfill, the stand-in API, other processes); then JSON. ::

    .venv/bin/python bench/cutover.py --videos 200                            # quick: 2-3 minutes
    .venv/bin/python bench/cutover.py --json-out bench/results/cutover.json    # 2,000 videos
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: the local text model ships in its package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # heimdex_assets_tests: the OpenAI stand-in

import argparse
import dataclasses
import json
import multiprocessing as mp
import platform
import queue
import random
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import dagster as dg
import numpy as np
from scene_embeddings import CONTENTION_WARNING, CpuMeter, _proc_cpu_s, fresh_database, peak_rss_mib
from sqlalchemy import event, insert, make_url, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from heimdex_assets.assets import scene_search_index, scene_text_embeddings
from heimdex_assets.db import tables
from heimdex_assets.db.embedded import EmbeddedPostgres
from heimdex_assets.demo import build_corpus, demo_id
from heimdex_assets.generations import Prunable, active_generations, prune_generation, rollback
from heimdex_assets.launch import RangeOutcome, contiguous_ranges, materialize_ranges
from heimdex_assets.models import record_models
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, ClipEmbedder, SearchIndex, TextEmbedder
from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID
from heimdex_assets.search import search_scenes
from heimdex_assets.steps import SCENE_TEXT

TARGET_RATIO = 1.2
WORK_DIR = Path("/tmp/heimdex-bench-cutover")
SEARCH_APP, BACKFILL_APP = "heimdex-bench-search", "heimdex-bench-backfill"  # application_name of each side
OPENAI_KEY = "sk-bench"
NEW_MODELS = ("text-embedding-3-small", "text-embedding-ada-002")  # the stand-in answers 1536 dimensions
PER_RUN = 50  # videos per run, as `heimdex reprocess --sync` and `heimdex demo` cut their ranges
PAUSE_SETTLE_S = 0.2  # after a pause begins, what the backfill had sent PostgreSQL may still be running
INDEX_PREFIX = "heimdex-bench-cutover"  # OpenSearch: the bench's own indexes, never the tests' or a deployment's

# What varies between scenes of a topic: who speaks, how the shot is framed and lit, how many people show.
SPEAKERS = ("Anna", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemi", "Luis")
SHOTS = ("Wide shot", "Close-up", "Medium shot", "Aerial view", "Handheld shot", "Slow pan", "Tracking shot")
LIGHT = ("at dawn", "in soft morning light", "at midday", "under an overcast sky", "in the late afternoon", "at dusk")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- corpus -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topic:
    """One demo topic: its title, transcript sentences, visuals (description, tags) and summaries."""

    key: str
    title: str
    sentences: tuple[str, ...]
    visuals: tuple[tuple[str, tuple[str, ...]], ...]
    summaries: tuple[str, ...]


def demo_topics(media: Path) -> list[Topic]:
    """The demo corpus's topics, read from a small build of it (two videos of each topic, seven scenes each)."""
    corpus = build_corpus(media, owners=1, videos_per_owner=30, scenes_per_video=7, processing_videos=0)
    found: dict[str, dict[str, Any]] = {}
    for video in corpus.videos:
        for s in video.scenes:
            t = found.setdefault(s.topic, {"title": video.title, "sentences": {}, "visuals": {}, "summaries": {}})
            t["sentences"] |= dict.fromkeys(re.split(r"(?<=\.)\s+(?=[A-Z])", s.transcript))
            t["visuals"][(s.visual_description, s.tags)] = None
            if s.summary:
                t["summaries"][s.summary] = None
    return [
        Topic(key, t["title"], tuple(t["sentences"]), tuple(t["visuals"]), tuple(t["summaries"]))
        for key, t in sorted(found.items())
    ]


def owner_topics(owner: int, topics: list[Topic]) -> list[Topic]:
    """The three topics an owner's videos are mostly about."""
    return [topics[(owner + k * 5) % len(topics)] for k in range(3)]


def scene_row(rng: random.Random, topic: Topic, video_id: uuid.UUID, owner_id: uuid.UUID, index: int) -> dict:
    """A scene of ``topic``: a speaker's two or three of its sentences; one of its visuals, framed and lit."""
    sentences = rng.sample(topic.sentences, rng.randint(2, 3))
    description, tags = rng.choice(topic.visuals)
    shot, light, people = rng.choice(SHOTS), rng.choice(LIGHT), rng.randint(0, 9)
    return {
        "id": demo_id(f"bench-cutover/scene/{video_id}/{index}"),
        "video_id": video_id,
        "owner_id": owner_id,
        "scene_index": index,
        "start_s": index * 12.0,
        "end_s": index * 12.0 + rng.uniform(4, 12),
        "transcript": f"{rng.choice(SPEAKERS)}: {' '.join(sentences)}",
        "visual_description": f"{shot} {light}. {description} {people} people in frame.",
        "tags": [*tags, shot.lower()],
    }


@dataclasses.dataclass
class Seeded:
    """The seeded corpus: partition keys in owner order, owners, and the (owner, query) pairs searched."""

    keys: list[str]
    scenes: int
    owners: list[uuid.UUID]
    pairs: list[tuple[uuid.UUID, str]]


def seed(db: AppDatabase, topics: list[Topic], n_videos: int, n_owners: int, n_scenes: int) -> Seeded:
    """Owners, READY videos and their scenes; each owner's videos are mostly about its three topics."""
    owners = [demo_id(f"bench-cutover/owner/{o}") for o in range(n_owners)]
    videos, scenes = [], []
    for v in range(n_videos):
        o, j = v % n_owners, v // n_owners
        rng = random.Random(f"video/{o}/{j}")
        topic = owner_topics(o, topics)[j % 3] if j % 4 else rng.choice(topics)
        video_id = demo_id(f"bench-cutover/video/{o}/{j}")
        videos.append({"id": video_id, "owner_id": owners[o], "title": f"{topic.title} ({j + 1})", "status": "READY"})
        scenes += [scene_row(rng, topic, video_id, owners[o], k) for k in range(n_scenes)]
    with db.transaction() as conn:
        conn.execute(insert(tables.owners), [{"id": o, "name": f"Bench owner {n}"} for n, o in enumerate(owners)])
        conn.execute(insert(tables.videos), videos)
        for start in range(0, len(scenes), 2000):
            conn.execute(insert(tables.scenes), scenes[start : start + 2000])
    # Per owner, one query per topic of its own: the topic's title (a few words) or a summary (a sentence).
    pairs = [
        (owners[o], t.title if (o + k) % 2 == 0 else t.summaries[o % len(t.summaries)])
        for o in range(n_owners)
        for k, t in enumerate(owner_topics(o, topics))
    ]
    keys = [str(v["id"]) for v in videos]  # in creation order, owners interleaved, as uploads arrive
    return Seeded(keys, len(scenes), owners, pairs)


# --- helpers ----------------------------------------------------------------------------------------------


def with_app_name(url: str, name: str) -> str:
    """``url`` with an application_name, so that each side's server backends can be told apart."""
    return make_url(url).update_query_dict({"application_name": name}).render_as_string(hide_password=False)


def pid_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a live process (0 once it has gone)."""
    try:
        return sum(_proc_cpu_s(Path(f"/proc/{pid}/stat").read_text())[1][:2])
    except (OSError, ValueError, IndexError):
        return 0.0


def percentiles(seconds: list[float]) -> dict[str, float | int]:
    """Count, p50/p95/p99, max and mean of latencies, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "n": len(ms),
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(ms.max()), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def machine() -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "dagster": dg.__version__,
    }


def empty_search_index(args: argparse.Namespace) -> SearchIndex:
    """The bench's BM25 index, emptied: an SQLite FTS5 file under the work dir, or its own OpenSearch indexes."""
    if args.opensearch_url:
        index = SearchIndex(opensearch_url=args.opensearch_url, index_prefix=INDEX_PREFIX)
        for version in index.versions():
            index.backend.drop(index.index_name(version))
        return index
    sqlite = args.work_dir / "search.sqlite"
    sqlite.unlink(missing_ok=True)
    return SearchIndex(sqlite_path=str(sqlite))


def blas_threads() -> list[dict[str, Any]]:
    """The BLAS libraries this process loaded and their thread counts (the searcher's query vectors use them)."""
    from threadpoolctl import threadpool_info

    return [
        {"library": i.get("internal_api"), "threads": i.get("num_threads")}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


# --- the two processes beside the searcher ----------------------------------------------------------------


def serve_fake_openai(urls: Any) -> None:
    """The OpenAI stand-in, in a process of its own (its JSON work is not the searcher's), until terminated."""
    from heimdex_assets_tests.fake_openai import FakeOpenAI

    urls.put(FakeOpenAI().start().url)
    threading.Event().wait()


def run_backfill(url: str, keys: list[str], api_url: str, model: str, per_run: int, nice: int, events: Any, go: Any):
    """Generation 2 of ``scene_text_embeddings`` over ``keys``, in ranges as ``heimdex reprocess --sync`` runs them.

    Says ``ready`` once set up (imports, instance, partitions), starts on ``go``, reports each range and ``done``."""
    os.nice(nice)
    db = AppDatabase(url=with_app_name(url, BACKFILL_APP))
    embedder = TextEmbedder(provider="openai", openai_api_key=OPENAI_KEY, openai_base_url=api_url, openai_model=model)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(videos_partitions.name, keys)
        ranges = contiguous_ranges(instance.get_dynamic_partitions(videos_partitions.name), set(keys), per_run)
        db.engine  # noqa: B018 - connect and check migrations before the clock starts
        events.put(("ready", len(ranges)))
        go.wait()
        cpu0, started = sum(os.times()[:2]), time.monotonic()

        def done(o: RangeOutcome) -> None:
            events.put(("range", time.monotonic(), len(o.keys), o.success, o.error if not o.success else None))

        outcomes = materialize_ranges(
            [scene_text_embeddings], ranges, {"db": db, "text_embedder": embedder}, instance, on_range_done=done
        )
        ended = time.monotonic()
    key = scene_text_embeddings.key.to_user_string()
    meta = [o.metadata.get(key, {}) for o in outcomes]
    totals = {
        f: sum(int(m.get(f, 0) or 0) for m in meta)
        for f in ("items", "items_computed", "rows_written", "failures", "texts_embedded", "reused_from_cache")
    }
    totals["api_requests"] = sum(int(m.get("api_requests", 0) or 0) for m in meta)
    activated = [m["activated_generation"] for m in meta if m.get("activated_generation")]
    failed = [o.error for o in outcomes if not o.success]
    events.put(("done", started, ended, sum(os.times()[:2]) - cpu0, totals, activated, failed))


# --- searching --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Search:
    mode: str
    pair: int
    started: float  # time.monotonic(): comparable with the backfill's clock
    seconds: float
    sql_seconds: float  # inside cursor.execute: PostgreSQL's work and the transfer of the rows
    scene_ids: tuple[str, ...]


class Searcher:
    """One thread searching (owner, query) pairs in turn, each in every mode, as an API process would."""

    def __init__(self, db: AppDatabase, embedder: TextEmbedder, index: SearchIndex, pairs: list, modes: list[str]):
        self.db, self.embedder, self.index, self.pairs, self.modes = db, embedder, index, pairs, modes
        self.clip = ClipEmbedder(model_name="tiny-random")  # placeholder: no CLIP ranking, no weights loaded
        self.n = 0
        self.sql_s = 0.0
        event.listen(db.engine, "before_cursor_execute", self._before)
        event.listen(db.engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.sql_s += time.perf_counter() - conn.info.pop("bench_t0")

    def one(self) -> Search:
        mode = self.modes[self.n % len(self.modes)]
        pair = self.n // len(self.modes) % len(self.pairs)
        owner, query = self.pairs[pair]
        self.n += 1
        started, self.sql_s = time.monotonic(), 0.0
        t0 = time.perf_counter()
        found = search_scenes(
            self.db,
            owner,
            query,
            mode=mode,
            limit=10,
            text_embedder=self.embedder,
            clip=self.clip,
            search_index=self.index,
        )
        seconds = time.perf_counter() - t0
        return Search(mode, pair, started, seconds, self.sql_s, tuple(str(r.scene_id) for r in found))

    def each_pair_once(self) -> dict[tuple[str, int], tuple[str, ...]]:
        """Every (mode, pair)'s results, once each."""
        self.n = 0
        out = {}
        for _ in range(len(self.pairs) * len(self.modes)):
            s = self.one()
            out[(s.mode, s.pair)] = s.scene_ids
        return out


class CpuSampler:
    """CPU seconds so far of the machine, this process, PostgreSQL (split: the searcher's backends, the rest)
    and the stand-in API process."""

    def __init__(self, meter: CpuMeter, db: AppDatabase, api_pid: int) -> None:
        self.meter, self.db, self.api_pid = meter, db, api_pid

    def sample(self) -> dict[str, float]:
        with self.db.engine.connect() as conn:
            pids = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :app"), {"app": SEARCH_APP}
            ).scalars()
            search_pg = sum(pid_cpu_s(p) for p in pids)
        busy, ours, pg = self.meter.sample()
        return {"busy": busy, "searcher": ours, "pg_search": search_pg, "pg": pg, "api": pid_cpu_s(self.api_pid)}


def cpu_split(before: dict[str, float], after: dict[str, float], wall: float, backfill_cpu: float) -> dict[str, float]:
    """Where the CPU went in a phase: seconds per consumer, and each one's share of the machine."""
    d = {k: after[k] - before[k] for k in before}
    split = {
        "searcher": d["searcher"],
        "postgres_for_searcher": d["pg_search"],
        "postgres_other": d["pg"] - d["pg_search"],  # the backfill's writes, autovacuum, WAL, checkpoints
        "backfill": backfill_cpu,
        "fake_openai": d["api"],
    }
    split = {k: max(0.0, v) for k, v in split.items()}
    split["other_processes"] = max(0.0, d["busy"] - sum(split.values()))
    capacity = wall * (os.cpu_count() or 1)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": {k: round(v, 2) for k, v in split.items()},
        "share_of_machine": {k: round(v / capacity, 3) for k, v in split.items()} if capacity else {},
        "machine_busy": round(d["busy"] / capacity, 3) if capacity else 0.0,
    }


# --- phases -----------------------------------------------------------------------------------------------


def restore_saved_vectors(db: AppDatabase, path: Path) -> int:
    """MiniLM vectors a previous run saved, put back in the (emptied) text cache: generation 1's run then reads
    them as it reads any cached text, instead of paying the model again. Returns how many."""
    if not path.exists():
        return 0
    saved = np.load(path)
    rows = [
        {"model_id": LOCAL_MODEL_ID, "text_sha256": str(sha), "embedding": vector, "truncated": bool(cut)}
        for sha, vector, cut in zip(saved["sha256"], saved["vectors"], saved["truncated"], strict=True)
    ]
    with db.transaction() as conn:
        for start in range(0, len(rows), 2000):
            conn.execute(pg_insert(tables.text_embedding_cache).on_conflict_do_nothing(), rows[start : start + 2000])
    return len(rows)


def save_vectors(db: AppDatabase, path: Path) -> None:
    """The text cache's MiniLM vectors, for the next run's generation 1."""
    c = tables.text_embedding_cache
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(c.c.text_sha256, c.c.embedding, c.c.truncated).where(c.c.model_id == LOCAL_MODEL_ID)
        ).all()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        sha256=np.asarray([r[0] for r in rows]),
        vectors=np.stack([np.asarray(r[1], dtype=np.float32) for r in rows]),
        truncated=np.asarray([r[2] for r in rows]),
    )
    tmp.replace(path)


def build_generation_1(db_url: str, keys: list[str], index: SearchIndex | None, per_run: int) -> dict[str, Any]:
    """Generation 1 of the text vectors (MiniLM) and of the search index, through the assets, ranges of ``per_run``."""
    assets = [scene_text_embeddings] + ([scene_search_index] if index is not None else [])
    resources: dict[str, Any] = {"db": AppDatabase(url=db_url), "text_embedder": TextEmbedder(provider="local")}
    if index is not None:
        resources["search_index"] = index
    started, done = time.perf_counter(), [0]

    def progress(o: RangeOutcome) -> None:
        done[0] += len(o.keys)
        if not o.success:
            raise SystemExit(f"generation 1: a run over {len(o.keys)} videos failed: {o.error}")
        say(f"  generation 1: {done[0]}/{len(keys)} videos, {time.perf_counter() - started:.0f} s")

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(videos_partitions.name, keys)
        ranges = contiguous_ranges(instance.get_dynamic_partitions(videos_partitions.name), set(keys), per_run)
        outcomes = materialize_ranges(assets, ranges, resources, instance, on_range_done=progress)
    wall = time.perf_counter() - started
    key = scene_text_embeddings.key.to_user_string()
    return {
        "wall_s": round(wall, 1),
        "videos_per_s": round(len(keys) / wall, 2),
        "text_items": sum(int(o.metadata[key]["items"]) for o in outcomes),
        "texts_embedded": sum(int(o.metadata[key]["texts_embedded"]) for o in outcomes),
        "texts_from_cache": sum(int(o.metadata[key]["reused_from_cache"]) for o in outcomes),
        "runs": len(outcomes),
    }


def prune_new_generation(db: AppDatabase, model: str) -> None:
    """No generation 2 written any more (generation 1 serves): its rows, ledger and cached vectors deleted, so
    that the next backfill does all the work again."""
    prune_generation(db.engine, Prunable(SCENE_TEXT.name, SCENE_TEXT.version, model, None))
    with db.transaction() as conn:
        conn.execute(text("DELETE FROM text_embedding_cache WHERE model_id = :m"), {"m": model})
    # As after generation 1's build: no dead rows of the pruned generation left for the next round to meet.
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE scene_text_vectors, text_embedding_cache, partition_ledger"))


def last_event_id(db: AppDatabase) -> int:
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT coalesce(max(id), 0) FROM generation_events")).scalar_one()


def serving_text_model(db: AppDatabase) -> str:
    with db.engine.connect() as conn:
        return active_generations(conn)[SCENE_TEXT.name].model_id


def idle_phase(searcher: Searcher, sampler: CpuSampler, n: int) -> tuple[list[Search], dict[str, Any]]:
    """``n`` searches, nothing else of the bench running; their CPU split."""
    searcher.n = 0
    c0, t0 = sampler.sample(), time.perf_counter()
    found = [searcher.one() for _ in range(n)]
    return found, cpu_split(c0, sampler.sample(), time.perf_counter() - t0, 0.0)


@dataclasses.dataclass
class Backfill:
    """What the backfill subprocess reported, and the searches made meanwhile."""

    searches: list[Search]
    started: float
    ended: float
    go_at: float
    run_ends: list[float]
    totals: dict[str, int]
    activated: list[str]
    cpu: dict[str, Any]
    pauses: list[tuple[float, float]]  # --pause-every: when the backfill was stopped

    def paused_s(self) -> float:
        """How long the backfill was stopped between its first run's start and its end."""
        return sum(max(0.0, min(b, self.ended) - max(a, self.started)) for a, b in self.pauses)

    def phase_of(self, s: Search) -> str:
        """``paused`` (wholly within a pause, once the statement in flight had time to end), ``running``
        (wholly while the backfill's runs ran), else ``edge``."""
        end = s.started + s.seconds
        if any(a + PAUSE_SETTLE_S <= s.started and end <= b for a, b in self.pauses):
            return "paused"
        if (
            self.started <= s.started
            and end <= self.ended
            and not any(s.started < b and a < end for a, b in self.pauses)
        ):
            return "running"
        return "edge"


def backfill_phase(
    args: argparse.Namespace,
    nice: int,
    db_url: str,
    keys: list[str],
    api_url: str,
    searcher: Searcher,
    sampler: CpuSampler,
) -> Backfill:
    """Generation 2 written by a subprocess (spawned: nothing of this process's state) while this thread searches."""
    ctx = mp.get_context("spawn")
    events, go = ctx.Queue(), ctx.Event()
    worker = ctx.Process(
        target=run_backfill,
        args=(db_url, keys, api_url, args.new_model, args.per_run, nice, events, go),
        name="bench-backfill",
    )
    worker.start()
    _, n_ranges = events.get(timeout=300)
    say(f"  backfill ready ({n_ranges} runs of <= {args.per_run} videos, nice {nice}); searching meanwhile")
    searcher.n = 0
    during: list[Search] = []
    run_ends: list[float] = []
    pauses: list[tuple[float, float]] = []
    paused_since = None
    stopped = (worker.pid,)  # not the API: searches after the flip embed their queries there
    c0, t0, go_at = sampler.sample(), time.perf_counter(), time.monotonic()
    next_toggle = go_at + args.pause_every if args.pause_every else float("inf")
    go.set()
    finished, last_note = None, time.monotonic()
    try:
        while finished is None:
            if time.monotonic() >= next_toggle:  # --pause-every: stop or resume the backfill
                now = time.monotonic()
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP if paused_since is None else signal.SIGCONT)
                if paused_since is not None:
                    pauses.append((paused_since, now))
                paused_since = now if paused_since is None else None
                next_toggle = now + args.pause_every
            during.append(searcher.one())
            try:
                while True:
                    msg = events.get_nowait()
                    if msg[0] != "range":
                        finished = msg
                    elif not msg[3]:
                        raise SystemExit(f"a backfill run over {msg[2]} videos failed: {msg[4]}")
                    else:
                        run_ends.append(msg[1])
            except queue.Empty:
                pass
            if finished is None and not worker.is_alive():
                raise SystemExit(f"the backfill process ended (exit code {worker.exitcode}) without reporting")
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                say(f"  backfill: {len(run_ends)}/{n_ranges} runs done; {len(during)} searches so far")
    finally:
        if paused_since is not None:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            pauses.append((paused_since, time.monotonic()))
    _, started, ended, backfill_cpu, totals, activated, failed = finished
    cpu = cpu_split(c0, sampler.sample(), time.perf_counter() - t0, backfill_cpu)
    worker.join(timeout=60)
    if failed:
        raise SystemExit(f"{len(failed)} backfill run(s) failed; first: {failed[0]}")
    return Backfill(during, started, ended, go_at, run_ends, totals, activated, cpu, pauses)


def mode_figures(
    before: list[Search], after: list[Search], during: list[Search], after_flip: list[Search], paused: list[Search]
) -> dict[str, Any]:
    """One mode's latencies per phase; p95 (and p50) during / idle, idle being before and after together (and
    during / paused with --pause-every); the time inside PostgreSQL and outside it (query vector, BM25, Python)."""

    def seconds(found: list[Search]) -> list[float]:
        return [s.seconds for s in found]

    idle = percentiles(seconds(before + after))
    d = percentiles(seconds(during))

    def ratio(q: str, base: dict) -> float | None:
        return round(d[q] / base[q], 3) if d["n"] and base["n"] else None

    return {
        "idle": idle,
        "idle_before": percentiles(seconds(before)),
        "idle_after": percentiles(seconds(after)),
        "during": d,
        "after_flip_during_backfill": percentiles(seconds(after_flip)),
        "paused": percentiles(seconds(paused)),
        "ratio_p95_vs_paused": ratio("p95_ms", percentiles(seconds(paused))),
        "sql": {
            "idle": percentiles([s.sql_seconds for s in before + after]),
            "during": percentiles([s.sql_seconds for s in during]),
        },
        "outside_sql": {
            "idle": percentiles([s.seconds - s.sql_seconds for s in before + after]),
            "during": percentiles([s.seconds - s.sql_seconds for s in during]),
        },
        "ratio_p95": ratio("p95_ms", idle),
        "ratio_p50": ratio("p50_ms", idle),
        "ratio_p95_vs_before": ratio("p95_ms", percentiles(seconds(before))),
        "target_met": ratio("p95_ms", idle) is not None and ratio("p95_ms", idle) <= TARGET_RATIO,
    }


def run_round(
    args: argparse.Namespace,
    nice: int,
    db_url: str,
    seeded: Seeded,
    searcher: Searcher,
    sampler: CpuSampler,
    api_url: str,
) -> dict[str, Any]:
    """Idle searches; searches while the backfill runs; the checks; a rollback and idle searches again (the same
    generation as before, beside generation 2's rows now); the figures."""
    db = searcher.db
    if serving_text_model(db) != LOCAL_MODEL_ID:
        raise SystemExit(f"round start: {serving_text_model(db)} serves, expected {LOCAL_MODEL_ID}")
    events_from = last_event_id(db)
    # Every pair at least once per mode: the searches during the backfill are checked against its idle results.
    n_idle = max(args.idle_searches, len(seeded.pairs)) * len(args.modes)

    before, before_cpu = idle_phase(searcher, sampler, n_idle)
    idle_results: dict[tuple[str, int], set[tuple[str, ...]]] = {}
    for s in before:
        idle_results.setdefault((s.mode, s.pair), set()).add(s.scene_ids)
    unstable = sorted(k for k, v in idle_results.items() if len(v) > 1)
    say(f"  idle before: {len(before)} searches in {before_cpu['wall_s']} s")

    bf = backfill_phase(args, nice, db_url, seeded.keys, api_url, searcher, sampler)

    # Checks: exactly one flip, to the new model; old results before it, new results after it.
    with db.engine.connect() as conn:
        flips = conn.execute(
            text("SELECT action, model_id FROM generation_events WHERE id > :after AND step = :step ORDER BY id"),
            {"after": events_from, "step": SCENE_TEXT.name},
        ).all()
    serving_after = serving_text_model(db)
    new_results = searcher.each_pair_once()
    kinds = []
    for s in bf.searches:
        old = s.scene_ids in idle_results[(s.mode, s.pair)]
        new = s.scene_ids == new_results[(s.mode, s.pair)]
        kinds.append("both" if old and new else "old" if old else "new" if new else "neither")
    first_new = next((i for i, k in enumerate(kinds) if k == "new"), len(kinds))

    # Back to generation 1 (a real rollback), then idle again: the same reads as before, with generation 2's
    # rows now beside them, and whatever else the machine does by now.
    with db.transaction() as conn:
        rollback(conn, SCENE_TEXT.name, actor="bench cutover", reason="idle searches after the backfill")
    after, after_cpu = idle_phase(searcher, sampler, n_idle)
    say(f"  idle after (rolled back): {len(after)} searches in {after_cpu['wall_s']} s")
    checks = {
        "flip_events": [f"{f.action} {f.model_id}" for f in flips],
        "one_flip_to_the_new_model": [tuple(f) for f in flips] == [("activate", args.new_model)],
        "serving_after_the_backfill": serving_after,
        "activated_by_the_backfill": bf.activated,
        "idle_pairs_unstable": len(unstable),
        "searches_old_generation": kinds.count("old"),
        "searches_new_generation": kinds.count("new"),
        "searches_same_results_in_both": kinds.count("both"),
        "searches_neither": kinds.count("neither"),
        "old_before_the_flip_only": all(k in ("old", "both") for k in kinds[:first_new])
        and all(k in ("new", "both") for k in kinds[first_new:]),
        "pairs_new_results_differ": sum(new_results[k] not in v for k, v in idle_results.items()),
        "rollback_restores_idle_results": all(s.scene_ids in idle_results[(s.mode, s.pair)] for s in after),
    }
    checks["passed"] = (
        checks["one_flip_to_the_new_model"]
        and serving_after == args.new_model
        and checks["searches_neither"] == 0
        and checks["old_before_the_flip_only"]
        and checks["rollback_restores_idle_results"]
        and not unstable
    )

    # During: the searches that read the old generation while the backfill's runs ran (and, with --pause-every,
    # those made while it was stopped: idle under the same background load).
    old_gen = [s for s, k in zip(bf.searches, kinds, strict=True) if k in ("old", "both")]
    in_window = [s for s in old_gen if bf.phase_of(s) == "running"]
    in_pauses = [s for s in old_gen if bf.phase_of(s) == "paused"]
    after_flip = [s for s, k in zip(bf.searches, kinds, strict=True) if k == "new"]

    def of(mode: str, found: list[Search]) -> list[Search]:
        return [s for s in found if s.mode == mode]

    backfill_s = bf.ended - bf.started - bf.paused_s()
    return {
        "backfill_nice": nice,
        "modes": {
            m: mode_figures(of(m, before), of(m, after), of(m, in_window), of(m, after_flip), of(m, in_pauses))
            for m in args.modes
        },
        "backfill": {
            "videos": len(seeded.keys),
            "runs": len(bf.run_ends),
            "wall_s": round(backfill_s, 2),  # not counting --pause-every's pauses
            "paused_s": round(bf.paused_s(), 2),
            "videos_per_s": round(len(seeded.keys) / backfill_s, 2),
            "text_items_per_s": round(bf.totals["items"] / backfill_s, 1),
            "startup_before_first_run_s": round(bf.started - bf.go_at, 3),
            # the last run holds the flip and its evaluation gate
            "run_wall_s": [round(b - a, 2) for a, b in pairwise([bf.started, *bf.run_ends])],
            **bf.totals,
        },
        "searches_during_backfill": len(bf.searches),
        "checks": checks,
        "cpu": {"idle_before": before_cpu, "during": bf.cpu, "idle_after": after_cpu},
    }


# --- report -----------------------------------------------------------------------------------------------


def p50_95(p: dict[str, Any]) -> str:
    return f"{p['p50_ms']:.1f}/{p['p95_ms']:.1f}"


def print_report(report: dict[str, Any], out: Callable[[str], None]) -> None:
    m, c = report["machine"], report["corpus"]
    out("")
    out(
        f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable, {m['cpu_model']}), {m['memory_gib']} GiB; "
        f"load average {m['load_avg_1m_at_start']} at start"
    )
    out(
        f"corpus: {c['videos']} READY videos x {c['scenes_per_video']} scenes = {c['scenes']} scenes, "
        f"{c['owners']} owners, {c['pairs']} (owner, query) pairs; search index: {report['search_index']}"
    )
    g = report["generation_1"]
    out(
        f"generation 1 ({LOCAL_MODEL_ID}, local): {g['wall_s']} s, {g['videos_per_s']} videos/s, "
        f"{g['texts_embedded']} texts embedded by the model, {g['texts_from_cache']} read from the text cache "
        f"({g['saved_vectors_restored']} vectors saved by an earlier run restored into it), {g['text_items']} items"
    )
    out(f"generation 2 ({report['new_model']}, OpenAI stand-in in its own process): written by the backfill")
    threads = sorted({b["threads"] for b in report["query_blas_threads"]})
    limited = "limited by --query-blas-threads" if report["query_blas_threads_limit"] else "unlimited, as the API runs"
    out(f"searcher: one thread, in-process; BLAS threads of its MiniLM query vectors: {threads} ({limited})")
    for n, r in enumerate(report["rounds"], 1):
        b, ch = r["backfill"], r["checks"]
        out("")
        out(f"round {n}: backfill at nice {r['backfill_nice']}")
        out(f"  {'mode':<9}{'phase':<13}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
        for mode, x in r["modes"].items():
            for phase in ("idle_before", "idle_after", "idle", "paused", "during", "after_flip_during_backfill"):
                p = x[phase]
                label = {"idle": "idle (both)", "after_flip_during_backfill": "after flip"}.get(phase, phase)
                if p["n"]:
                    out(
                        f"  {mode:<9}{label:<13}{p['n']:>6}{p['p50_ms']:>9.2f}{p['p95_ms']:>9.2f}"
                        f"{p['p99_ms']:>9.2f}{p['max_ms']:>9.2f}"
                    )
            verdict = "met" if x["target_met"] else "NOT met"
            out(
                f"  {mode:<9}p95 during / idle = {x['ratio_p95']} (<= {TARGET_RATIO}: {verdict}); "
                f"p50 {x['ratio_p50']}; p95 vs idle before only {x['ratio_p95_vs_before']}"
                + (f"; p95 during / paused {x['ratio_p95_vs_paused']}" if x["paused"]["n"] else "")
            )
            sql, rest = x["sql"], x["outside_sql"]
            if sql["during"]["n"]:
                out(
                    f"  {mode:<9}p50/p95 ms in PostgreSQL: idle {p50_95(sql['idle'])}, during {p50_95(sql['during'])}; "
                    f"outside it (query vector, BM25, Python): idle {p50_95(rest['idle'])}, "
                    f"during {p50_95(rest['during'])}"
                )
        out(
            f"  backfill: {b['videos']} videos in {b['wall_s']} s = {b['videos_per_s']} videos/s "
            f"({b['text_items_per_s']} text items/s, {b['runs']} runs, {b['texts_embedded']} texts embedded, "
            f"{b['rows_written']} rows written, {b['failures']} failures)"
        )
        walls = b["run_wall_s"]
        if walls:
            out(
                f"  backfill runs: median {float(np.median(walls)):.1f} s; the last (the flip, its evaluation gate) "
                f"{walls[-1]:.1f} s"
            )
        out(
            f"  searches during the backfill: {r['searches_during_backfill']} ({ch['searches_old_generation']} old "
            f"generation, {ch['searches_new_generation']} new after the flip, {ch['searches_neither']} neither)"
        )
        out(
            f"  checks: {'PASSED' if ch['passed'] else 'FAILED'}: flips {ch['flip_events']}, serving after: "
            f"{ch['serving_after_the_backfill']}; old results until the flip, new after: "
            f"{ch['old_before_the_flip_only']}; idle pairs with varying results: {ch['idle_pairs_unstable']}; "
            f"rollback gives the idle results again: {ch['rollback_restores_idle_results']}"
        )
        for phase, x in r["cpu"].items():
            shares = ", ".join(f"{k} {v:.0%}" for k, v in x["share_of_machine"].items() if v >= 0.005)
            out(f"  cpu {phase:<11} {x['wall_s']:>7.1f} s wall, machine {x['machine_busy']:.0%} busy: {shares}")
        busy = max(x["share_of_machine"].get("other_processes", 0.0) for x in r["cpu"].values())
        if busy > CONTENTION_WARNING:
            out(
                f"  WARNING: processes outside the bench took up to {busy:.0%} of the machine in a phase: the "
                "latencies are theirs as much as the backfill's; compare idle before and after, rerun when quiet"
            )


# --- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--owners", type=int, default=20)
    parser.add_argument("--scenes", type=int, default=5, help="scenes per video")
    parser.add_argument("--idle-searches", type=int, default=300, help="idle searches per mode")
    parser.add_argument("--modes", default="semantic,hybrid", help="search modes, alternated (semantic, hybrid)")
    parser.add_argument("--new-model", choices=NEW_MODELS, default=NEW_MODELS[0], help="generation 2's model")
    parser.add_argument(
        "--backfill-nice", default="0", help="comma-separated nice levels of the backfill: one round each"
    )
    parser.add_argument(
        "--pause-every",
        type=float,
        default=0.0,
        help="stop the backfill (SIGSTOP) every S seconds for S seconds: idle samples under the same background load",
    )
    parser.add_argument(
        "--query-blas-threads",
        type=int,
        default=1,
        help="BLAS threads of the searcher's MiniLM query vectors (NumPy); 0: unlimited, as the API runs today",
    )
    parser.add_argument("--per-run", type=int, default=PER_RUN, help="videos per run of each generation's build")
    parser.add_argument("--opensearch-url", default=None, help="BM25 in OpenSearch (indexes " + INDEX_PREFIX + "-*)")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    parser.add_argument("--pg-port", type=int, default=55503)
    parser.add_argument("--database", default="heimdex_bench", help="emptied by the run: never a real one")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="generation 1 embeds every text with MiniLM (default: vectors a previous run saved are reused)",
    )
    parser.add_argument("--keep-server", action="store_true", help="leave the embedded server running (to explore)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    nices = [int(n) for n in args.backfill_nice.split(",")]
    if not set(args.modes) <= {"semantic", "hybrid"} or not args.modes:
        parser.error("--modes: semantic and/or hybrid")
    if min(args.videos, args.owners, args.scenes, args.idle_searches, args.per_run) < 1:
        parser.error("--videos, --owners, --scenes, --idle-searches and --per-run must be at least 1")

    server = EmbeddedPostgres(data_dir=args.work_dir / "postgres", port=args.pg_port, database=args.database)
    started_server = not server.is_ready()
    hybrid = "hybrid" in args.modes
    report: dict[str, Any] = {"machine": machine(), "new_model": args.new_model, "target_ratio": TARGET_RATIO}
    ctx = mp.get_context("spawn")
    api = None
    try:
        say(f"database: embedded PostgreSQL on port {args.pg_port} under {args.work_dir}; emptying it")
        url = server.ensure_running()
        db = fresh_database(url)
        index = empty_search_index(args) if hybrid else None
        report["search_index"] = index.describe() if index is not None else "none (semantic only)"

        t = time.perf_counter()
        topics = demo_topics(args.work_dir / "media")
        shutil.rmtree(args.work_dir / "media", ignore_errors=True)  # only the texts were wanted
        seeded = seed(db, topics, args.videos, args.owners, args.scenes)
        report["corpus"] = {
            "videos": len(seeded.keys),
            "scenes_per_video": args.scenes,
            "scenes": seeded.scenes,
            "owners": args.owners,
            "topics": len(topics),
            "pairs": len(seeded.pairs),
            "seed_s": round(time.perf_counter() - t, 1),
        }
        say(f"seeded {len(seeded.keys)} videos, {seeded.scenes} scenes in {report['corpus']['seed_s']} s")

        saved = args.work_dir / "minilm-vectors.npz"
        restored = 0 if args.cold else restore_saved_vectors(db, saved)
        say(f"generation 1: {LOCAL_MODEL_ID} (local) over {len(seeded.keys)} videos; {restored} saved vectors")
        report["generation_1"] = build_generation_1(url, seeded.keys, index, args.per_run)
        report["generation_1"]["saved_vectors_restored"] = restored
        if not args.cold:
            save_vectors(db, saved)
        with db.engine.connect() as conn:
            gen = active_generations(conn).get(SCENE_TEXT.name)
        if gen is None or gen.model_id != LOCAL_MODEL_ID:
            raise SystemExit(f"generation 1 did not become active: {gen}")
        with db.engine.connect() as conn:
            distinct = conn.execute(
                text("SELECT count(DISTINCT input_sha256) FROM scene_text_vectors WHERE model_id = :m"),
                {"m": LOCAL_MODEL_ID},
            ).scalar_one()
        report["corpus"]["distinct_texts"] = distinct

        urls = ctx.Queue()
        api = ctx.Process(target=serve_fake_openai, args=(urls,), name="bench-fake-openai", daemon=True)
        api.start()
        api_url = urls.get(timeout=120)
        with db.transaction() as conn:  # the deployment moves to the new model, as `heimdex models use` does
            record_models(conn, {SCENE_TEXT.name: args.new_model}, "bench cutover")

        search_db = AppDatabase(url=with_app_name(url, SEARCH_APP))
        embedder = TextEmbedder(
            provider="openai", openai_api_key=OPENAI_KEY, openai_base_url=api_url, openai_model=args.new_model
        )
        search_index = SearchIndex(**index.model_dump()) if index is not None else None  # the API's own
        if args.query_blas_threads > 0:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=args.query_blas_threads, user_api="blas")
        report["query_blas_threads"] = blas_threads()
        report["query_blas_threads_limit"] = args.query_blas_threads
        searcher = Searcher(search_db, embedder, search_index, seeded.pairs, args.modes)
        for _ in range(3 * len(args.modes)):  # warm: MiniLM (NumPy) loaded, connections open, caches filled
            searcher.one()
        sampler = CpuSampler(CpuMeter(server.data_dir / "pgdata"), search_db, api.pid)

        report["rounds"] = []
        for n, nice in enumerate(nices):
            if n:
                say("generation 2 pruned for the next round")
                prune_new_generation(db, args.new_model)
            say(f"round {n + 1}: backfill at nice {nice}")
            os.setpriority(os.PRIO_PROCESS, api.pid, nice)  # the API's work is the backfill's: same priority
            report["rounds"].append(run_round(args, nice, url, seeded, searcher, sampler, api_url))
    finally:
        if api is not None:
            api.kill()  # not terminate(): a shell may have left SIGTERM ignored, and the children inherit that
            api.join(timeout=10)
        if started_server and not args.keep_server:  # leave the machine as we found it
            server.stop()
    report["peak_rss_mib"] = peak_rss_mib()
    print_report(report, print)
    print(json.dumps(report, indent=2, default=str))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if all(r["checks"]["passed"] for r in report["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
