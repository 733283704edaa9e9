"""Benchmark: lexical, semantic and hybrid search on known-item queries over the demo corpus (MRR@10).

1. setup: a private embedded PostgreSQL (port 55502 under /tmp/heimdex-bench-fusion), every table emptied,
   the demo corpus loaded (``build_corpus`` defaults, as ``heimdex demo``), ``scene_text_embeddings``
   (local all-MiniLM-L6-v2) and ``scene_search_index`` (SQLite FTS5, or ``--opensearch-url``) materialised
   for every READY video on a temporary Dagster instance, as the tests' ``world`` fixture does;
2. each query of ``fusion_queries.KNOWN_ITEMS`` resolved to its one target scene, then searched as its
   owner through ``search_scenes``: lexical and semantic at the depth hybrid fuses (``max(3 * limit, 30)``
   for ``limit=10``), hybrid at ``limit=10``; the product's hybrid must equal its fusion of the two lists;
3. every fusion setting of the grid applied to the same two lists: weighted RRF (``reciprocal_rank_fusion``
   with ``k`` and per-list weights) and, for comparison, a convex combination of min-max-normalised BM25
   and cosine scores (BM25 scores from the same index call; cosines from the stored vectors);
4. the queries split in two halves with the same mix of kinds (alternate queries of each kind): per family,
   each half picks its best setting, which is then scored on the other half, against the better single
   mode there, so a setting is judged on queries it was not chosen on.

Prints MRR@10 and recall@10 per mode, per half and per query kind, the grid, and JSON. Usage::

    .venv/bin/python bench/fusion.py --json-out bench/results/fusion.json
    .venv/bin/python bench/fusion.py --opensearch-url http://127.0.0.1:9250
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: the local text model ships in its package

import argparse
import json
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from fusion_queries import KNOWN_ITEMS
from opensearchpy import OpenSearch
from scene_embeddings import fresh_database
from sqlalchemy import select

from heimdex_assets.assets import scene_search_index, scene_text_embeddings
from heimdex_assets.db.embedded import EmbeddedPostgres
from heimdex_assets.db.tables import scene_text_vectors
from heimdex_assets.demo import Corpus, DemoScene, build_corpus, load_corpus
from heimdex_assets.generations import serving_generations
from heimdex_assets.launch import contiguous_ranges, materialize_ranges
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, ClipEmbedder, SearchIndex, TextEmbedder
from heimdex_assets.resources.clip_embedder import TINY_RANDOM_MODEL
from heimdex_assets.search import (
    HYBRID_RRF_K,
    HYBRID_WEIGHTS,
    RRF_K,
    SEMANTIC_CHANNELS,
    reciprocal_rank_fusion,
    search_scenes,
)

WORK_DIR = Path("/tmp/heimdex-bench-fusion")
LIMIT = 10  # MRR@10, recall@10: the CLI's and the API's default page
DEPTH = max(LIMIT * 3, 30)  # what search_scenes fetches from each list for limit=10
RRF_KS = (0, 1, 2, 5, 10, 20, 60)
BM25_WEIGHTS = (2, 1, 2 / 3, 1 / 2, 1 / 3, 1 / 4, 1 / 6)  # the text list weighs 1
CC_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)  # share of the semantic score in the convex combination
KINDS = ("shared", "synonym")
HYBRID_NOW = "hybrid, search_scenes now (RRF k={:g}, weights {}, others 1)".format(
    HYBRID_RRF_K, ", ".join(f"{name} {w:.3g}" for name, w in HYBRID_WEIGHTS.items())
)

Ranked = list[uuid.UUID]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scene_text(scene: DemoScene) -> str:
    return " ".join((scene.transcript, scene.visual_description, " ".join(scene.tags), scene.summary or "")).lower()


def resolve_targets(corpus: Corpus) -> list[DemoScene]:
    """Each known item's one target: the READY scene of its owner whose text holds every evidence phrase."""
    targets = []
    for n, item in enumerate(KNOWN_ITEMS):
        owner = corpus.owners[item.owner]
        found = [
            s
            for v in owner.videos
            if v.status == "READY"
            for s in v.scenes
            if all(e.lower() in scene_text(s) for e in item.evidence)
        ]
        if len(found) != 1:
            raise SystemExit(f"known item {n} ({item.query!r}): evidence {item.evidence} matches {len(found)} scenes")
        targets.append(found[0])
    return targets


def materialise(db: AppDatabase, corpus: Corpus, resources: dict[str, Any]) -> float:
    """Text vectors and search documents for every READY video, in ranges of 50; seconds taken."""
    started = time.monotonic()
    keys = [str(v.id) for v in corpus.videos if v.status == "READY"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(videos_partitions.name, keys)
        outcomes = materialize_ranges(
            [scene_text_embeddings, scene_search_index], contiguous_ranges(keys, set(keys), 50), resources, instance
        )
    failed = [o for o in outcomes if not o.success]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; first: {failed[0].error}")
    return time.monotonic() - started


def scene_cosines(
    db: AppDatabase, owner_id: uuid.UUID, query_vector: np.ndarray, model_id: str
) -> dict[uuid.UUID, float]:
    """Each of the owner's scenes' best cosine to the query over the semantic channels (as the text list ranks)."""
    with db.engine.connect() as conn:
        text_gen = serving_generations(conn, {"scene_text": model_id})["scene_text"]
        t = scene_text_vectors
        rows = conn.execute(
            select(t.c.scene_id, t.c.embedding).where(
                t.c.owner_id == owner_id,
                t.c.step_version == text_gen.version,
                t.c.model_id == text_gen.model_id,
                t.c.channel.in_(SEMANTIC_CHANNELS),
            )
        ).all()
    best: dict[uuid.UUID, float] = {}
    q = query_vector / np.linalg.norm(query_vector)
    for scene_id, embedding in rows:
        v = np.asarray(embedding, dtype=np.float32)
        best[scene_id] = max(best.get(scene_id, -1.0), float(v @ q / np.linalg.norm(v)))
    return best


def min_max(scores: dict[uuid.UUID, float]) -> dict[uuid.UUID, float]:
    lo, hi = min(scores.values(), default=0.0), max(scores.values(), default=0.0)
    return {k: (v - lo) / (hi - lo) if hi > lo else 1.0 for k, v in scores.items()}


def convex_fusion(bm25: dict[uuid.UUID, float], cosine: dict[uuid.UUID, float], alpha: float) -> Ranked:
    """alpha * cosine + (1 - alpha) * BM25, each min-max normalised over its own list (absent: 0)."""
    b, c = min_max(bm25), min_max(cosine)
    fused = {s: alpha * c.get(s, 0.0) + (1 - alpha) * b.get(s, 0.0) for s in dict.fromkeys([*b, *c])}
    return sorted(fused, key=lambda s: -fused[s])


def reciprocal_rank(ranked: Sequence[uuid.UUID], target: uuid.UUID) -> float:
    """1/rank of ``target`` within the first LIMIT, else 0."""
    top = list(ranked[:LIMIT])
    return 1.0 / (top.index(target) + 1) if target in top else 0.0


def figures(rrs: Sequence[float]) -> dict[str, float]:
    return {
        "mrr@10": round(sum(rrs) / len(rrs), 4) if rrs else 0.0,
        "recall@10": round(sum(rr > 0 for rr in rrs) / len(rrs), 4) if rrs else 0.0,
        "queries": len(rrs),
    }


def run_queries(db: AppDatabase, corpus: Corpus, r: dict[str, Any]) -> list[dict[str, Any]]:
    """For every known item: the target, the two lists hybrid fuses (with their scores) and the product's hybrid."""
    targets = resolve_targets(corpus)
    rows = []
    for item, target in zip(KNOWN_ITEMS, targets, strict=True):
        owner_id = corpus.owners[item.owner].id

        def search(mode: str, limit: int, query: str = item.query, owner_id: uuid.UUID = owner_id) -> Ranked:
            found = search_scenes(
                db,
                owner_id,
                query,
                mode=mode,
                limit=limit,
                text_embedder=r["text_embedder"],
                clip=r["clip"],
                search_index=r["search_index"],
            )
            return [x.scene_id for x in found]

        lexical, semantic, hybrid = search("lexical", DEPTH), search("semantic", DEPTH), search("hybrid", LIMIT)
        product = [
            s for s, _ in reciprocal_rank_fusion({"bm25": lexical, "text": semantic}, HYBRID_RRF_K, HYBRID_WEIGHTS)
        ]
        if product[:LIMIT] != hybrid:
            raise SystemExit(f"search_scenes' hybrid differs from the fusion of its lists for {item.query!r}")
        hits = r["search_index"].search(owner_id, item.query, DEPTH)
        bm25 = {uuid.UUID(str(h.scene_id)): h.score for h in hits}
        if list(bm25) != lexical:
            raise SystemExit(f"the index's hits differ from the lexical ranking for {item.query!r}")
        cosines = scene_cosines(db, owner_id, r["text_embedder"].embed_query(item.query), r["text_embedder"].model_id)
        video = next(v for v in corpus.videos if v.id == target.video_id)
        rows.append(
            {
                "item": item,
                "target": target.id,
                "target_name": f"{video.title} #{target.scene_index}",
                "lexical": lexical,
                "semantic": semantic,
                "hybrid": hybrid,
                "bm25_scores": bm25,
                "cosines": {s: cosines[s] for s in semantic},
            }
        )
    return rows


Fusion = Callable[[dict[str, Any]], Ranked]


def settings() -> dict[str, dict[str, Fusion]]:
    """The grid by family: weighted RRF (``reciprocal_rank_fusion``, bm25 weighted, text 1) and min-max CC."""
    rrf: dict[str, Fusion] = {}
    for k in RRF_KS:
        for w in BM25_WEIGHTS:

            def fuse(row: dict[str, Any], k: int = k, w: float = w) -> Ranked:
                fused = reciprocal_rank_fusion({"bm25": row["lexical"], "text": row["semantic"]}, k, {"bm25": w})
                return [s for s, _ in fused]

            rrf[f"rrf k={k} w_bm25={w:.3g}"] = fuse
    cc: dict[str, Fusion] = {
        f"minmax alpha={a:g}": lambda row, a=a: convex_fusion(row["bm25_scores"], row["cosines"], a) for a in CC_ALPHAS
    }
    return {"weighted RRF": rrf, "min-max convex combination": cc}


def halves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Two halves with the same mix of kinds: alternate queries of each kind go to a and b."""
    split: dict[str, list[dict[str, Any]]] = {"half_a": [], "half_b": []}
    for kind in KINDS:
        of_kind = [r for r in rows if r["item"].kind == kind]
        split["half_a"] += of_kind[0::2]
        split["half_b"] += of_kind[1::2]
    return split


def evaluate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures per mode (all queries, each half, each kind) and per grid setting; each family's setting
    chosen on one half and scored on the other, against the better single mode of that half."""
    groups = {"all": rows} | halves(rows) | {kind: [r for r in rows if r["item"].kind == kind] for kind in KINDS}
    modes: dict[str, Fusion] = {
        "lexical": lambda row: row["lexical"],
        "semantic": lambda row: row["semantic"],
        f"hybrid, old (RRF k={RRF_K}, equal weights)": lambda row: [
            s for s, _ in reciprocal_rank_fusion({"bm25": row["lexical"], "text": row["semantic"]})
        ],
        HYBRID_NOW: lambda row: row["hybrid"],
    }

    def score(fn: Fusion) -> dict[str, dict[str, float]]:
        return {g: figures([reciprocal_rank(fn(row), row["target"]) for row in group]) for g, group in groups.items()}

    mode_figures = {name: score(fn) for name, fn in modes.items()}
    better = {h: max(mode_figures[m][h]["mrr@10"] for m in ("lexical", "semantic")) for h in ("half_a", "half_b")}
    grid, cross = {}, {}
    for family, fusions in settings().items():
        scored = {name: score(fn) for name, fn in fusions.items()}
        grid |= scored
        for a, b in (("half_a", "half_b"), ("half_b", "half_a")):
            chosen = max(scored, key=lambda name, a=a: scored[name][a]["mrr@10"])  # ties: the grid's order
            cross[f"{family}, chosen on {a}"] = {
                "setting": chosen,
                a: scored[chosen][a]["mrr@10"],
                b: scored[chosen][b]["mrr@10"],
                f"{b} better single mode": better[b],
            }
    per_query = [
        {
            "query": row["item"].query,
            "kind": row["item"].kind,
            "target": row["target_name"],
            "ranks": dict(zip(modes, (rank_of(fn(row), row["target"]) for fn in modes.values()), strict=True)),
        }
        for row in rows
    ]
    return {"modes": mode_figures, "grid": grid, "cross_validation": cross, "per_query": per_query}


def rank_of(ranked: Sequence[uuid.UUID], target: uuid.UUID) -> int | None:
    return list(ranked).index(target) + 1 if target in ranked else None


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['queries']} known-item queries {report['kinds']}, {report['corpus']}")
    print(f"lexical: {report['search_backend']}; semantic: {report['text_model']}; lists fused {report['depth']} deep")
    cols = ("all", "half_a", "half_b", *KINDS)
    print(f"\nMRR@10 / recall@10 {''.join(f'{c:>16}' for c in cols)}")
    for name, by_group in report["modes"].items():
        print(
            f"  {name}\n{'':<19}"
            + "".join(f"{by_group[g]['mrr@10']:>9.3f} / {by_group[g]['recall@10']:.2f}" for g in cols)
        )
    print(f"\ngrid, MRR@10 {''.join(f'{c:>9}' for c in cols)}")
    for name, by_group in sorted(report["grid"].items(), key=lambda kv: -kv[1]["all"]["mrr@10"]):
        print(f"  {name:<24}" + "".join(f"{by_group[g]['mrr@10']:>9.3f}" for g in cols))
    print("\nchosen on one half (best MRR@10 there), scored on the other")
    for label, x in report["cross_validation"].items():
        held = next(h for h in ("half_a", "half_b") if h not in label)
        print(
            f"  {label}: {x['setting']}; on {held}: {x[held]:.3f} "
            f"(better single mode there: {x[f'{held} better single mode']:.3f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opensearch-url", help="index into this OpenSearch (a prefix of its own) instead of SQLite")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="media, the SQLite index, the server's data")
    parser.add_argument("--pg-port", type=int, default=55502)
    parser.add_argument("--database", default="heimdex_bench", help="emptied by the run: never a real one")
    parser.add_argument("--keep-server", action="store_true", help="leave the embedded server running (to explore)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    server = EmbeddedPostgres(data_dir=args.work_dir / "postgres", port=args.pg_port, database=args.database)
    started_server = not server.is_ready()
    prefix = f"heimdex-bench-fusion-{uuid.uuid4().hex[:8]}"
    if args.opensearch_url:
        index = SearchIndex(opensearch_url=args.opensearch_url, index_prefix=prefix)
    else:
        shutil.rmtree(args.work_dir / "search", ignore_errors=True)  # the database is emptied: so is the index
        index = SearchIndex(sqlite_path=str(args.work_dir / "search" / "scenes.sqlite"))
    try:
        db = fresh_database(server.ensure_running())
        corpus = build_corpus(args.work_dir / "media")
        with db.transaction() as conn:
            load_corpus(conn, corpus)
        resources = {
            "db": db,
            "text_embedder": TextEmbedder(provider="local"),
            "search_index": index,
            "clip": ClipEmbedder(model_name=TINY_RANDOM_MODEL),  # never loaded: placeholders rank no text
        }
        say(f"corpus: {len(corpus.videos)} videos, {len(corpus.scenes)} scenes; materialising text vectors and index")
        seconds = materialise(db, corpus, resources)
        say(f"materialised in {seconds:.1f} s; running {len(KNOWN_ITEMS)} queries")
        rows = run_queries(db, corpus, resources)
    finally:
        if args.opensearch_url:
            OpenSearch(hosts=[args.opensearch_url]).indices.delete(index=f"{prefix}-*")
        if started_server and not args.keep_server:  # leave the machine as we found it
            server.stop()

    ready = [v for v in corpus.videos if v.status == "READY"]
    report = {
        "queries": len(rows),
        "kinds": {kind: sum(r["item"].kind == kind for r in rows) for kind in KINDS},
        "corpus": f"{len(ready)} READY videos, {sum(len(v.scenes) for v in ready)} scenes, {len(corpus.owners)} owners",
        "search_backend": index.describe(),
        "text_model": resources["text_embedder"].model_id,
        "depth": DEPTH,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "materialise_s": round(seconds, 1),
        **evaluate(rows),
    }
    print_report(report)
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
