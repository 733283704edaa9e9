"""The ``heimdex`` command: ``heimdex demo`` (more subcommands join as the product grows).

Every error is one line on stderr with exit status 1 (2 for bad usage); secrets never appear.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence

from sqlalchemy import func, select

from heimdex_assets.db.engine import DatabaseUnavailableError
from heimdex_assets.db.tables import (
    embedding_failures,
    scene_clip_vectors,
    scene_text_vectors,
    scenes,
    videos,
)
from heimdex_assets.partitions import InvalidIdError
from heimdex_assets.search import SearchError
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION, SPEC

DEMO_ASSETS = ("scene_text_embeddings", "scene_clip_embeddings")


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}")
    sys.stderr.flush()
    if done >= total:
        sys.stderr.write("\n")


def demo(args: argparse.Namespace) -> dict:
    """Load the sample corpus into the configured database and materialise the assets for it."""
    from heimdex_assets.assets import EMBEDDING_ASSETS
    from heimdex_assets.demo import build_corpus, load_corpus
    from heimdex_assets.launch import contiguous_ranges, dagster_instance, materialize_ranges, media_dir
    from heimdex_assets.partitions import videos_partitions
    from heimdex_assets.sensors.video_discovery import plan_video_partitions
    from heimdex_assets.settings import resources_from_env

    started = time.monotonic()
    resources = resources_from_env()
    db = resources["db"]
    embedded = not os.environ.get("HEIMDEX_DATABASE_URL")
    say = (lambda *_: None) if args.json else (lambda msg: print(msg, flush=True))
    say(f"database: {db.describe()}{' (embedded)' if embedded else ''}")

    corpus = build_corpus(media_dir(), videos_per_owner=args.videos_per_owner, scenes_per_video=args.scenes)
    with db.transaction() as conn:
        load_corpus(conn, corpus)
    say(
        f"corpus: {len(corpus.owners)} owners, {len(corpus.videos)} videos, {len(corpus.scenes)} scenes "
        f"(media in {media_dir()})"
    )

    clip = resources["clip"]
    if clip.fallback_reason:
        say(f"note: {clip.fallback_reason}; using {clip.model_id} (placeholder vectors, stale once real weights load)")
    text = resources["text_embedder"]
    say(f"models: text {text.model_id} ({text.resolved_provider}), CLIP {clip.model_id}")

    instance = dagster_instance()
    existing = set(instance.get_dynamic_partitions(videos_partitions.name))
    with db.engine.connect() as conn:
        to_add, _ = plan_video_partitions(conn, existing)
    if to_add:
        instance.add_dynamic_partitions(videos_partitions.name, to_add)
    demo_ids = {str(v.id) for v in corpus.videos if v.status == "READY"}
    ranges = contiguous_ranges(instance.get_dynamic_partitions(videos_partitions.name), demo_ids, 50)
    assets = [a for a in EMBEDDING_ASSETS if a.key.to_user_string() in DEMO_ASSETS]
    say(
        f"materialising {', '.join(DEMO_ASSETS)} for {len(demo_ids)} video partitions "
        f"in {len(ranges)} run(s) (DAGSTER_HOME={os.environ['DAGSTER_HOME']})"
    )
    done = 0

    def progress(outcome: object) -> None:
        nonlocal done
        done += len(outcome.keys)
        if not args.json:
            _progress(done, len(demo_ids), "videos")

    outcomes = materialize_ranges(assets, ranges, resources, instance, on_range_done=progress)
    failed = [o for o in outcomes if not o.success]
    summary = _summary(db, corpus) | {
        "runs": len(outcomes),
        "failed_runs": [{"keys": f"{o.keys[0]}..{o.keys[-1]}", "error": o.error} for o in failed],
        "seconds": round(time.monotonic() - started, 1),
    }
    if failed:
        raise CliError(f"{len(failed)} run(s) failed; first: {failed[0].error}")
    return summary


def _summary(db: object, corpus: object) -> dict:
    owner_ids = [o.id for o in corpus.owners]
    with db.engine.connect() as conn:

        def count(q: object) -> int:
            return int(conn.execute(q).scalar() or 0)

        per_channel = dict(
            conn.execute(
                select(scene_text_vectors.c.channel, func.count())
                .where(scene_text_vectors.c.owner_id.in_(owner_ids))
                .group_by(scene_text_vectors.c.channel)
            ).all()
        )
        models = {
            "text": sorted(conn.execute(select(scene_text_vectors.c.model_id).distinct()).scalars()),
            "clip": sorted(conn.execute(select(scene_clip_vectors.c.model_id).distinct()).scalars()),
        }
        return {
            "spec_version": LATEST_EMBEDDING_SPEC_VERSION,
            "step_versions": {s.asset_key: s.version for s in SPEC.steps if s.asset_key in DEMO_ASSETS},
            "owners": len(owner_ids),
            "videos": count(select(func.count()).select_from(videos).where(videos.c.owner_id.in_(owner_ids))),
            "videos_ready": count(
                select(func.count())
                .select_from(videos)
                .where(videos.c.owner_id.in_(owner_ids), videos.c.status == "READY")
            ),
            "scenes": count(select(func.count()).select_from(scenes).where(scenes.c.owner_id.in_(owner_ids))),
            "vectors": {
                **{f"text/{k}": v for k, v in sorted(per_channel.items())},
                "clip": count(
                    select(func.count())
                    .select_from(scene_clip_vectors)
                    .where(scene_clip_vectors.c.owner_id.in_(owner_ids))
                ),
            },
            "failures": count(
                select(func.count()).select_from(embedding_failures).where(embedding_failures.c.owner_id.in_(owner_ids))
            ),
            "models": models,
        }


def _print_demo(summary: dict) -> None:
    print("\nHeimdex demo summary")
    print(f"  spec version     {summary['spec_version']}")
    for asset, version in summary["step_versions"].items():
        print(f"  {asset:<26} code version {version}")
    print(f"  owners           {summary['owners']}")
    print(f"  videos           {summary['videos']} ({summary['videos_ready']} READY; others skipped)")
    print(f"  scenes           {summary['scenes']}")
    for name, n in summary["vectors"].items():
        print(f"  vectors {name:<16} {n}")
    print(f"  failed items     {summary['failures']}")
    print(
        f"  models           text {', '.join(summary['models']['text'])}; clip {', '.join(summary['models']['clip'])}"
    )
    print(f"  runs             {summary['runs']}")
    print(f"  time taken       {summary['seconds']} s")


def search(args: argparse.Namespace) -> dict:
    """Search one owner's scenes: lexical, semantic or hybrid, optionally ranked by a person."""
    from heimdex_assets.partitions import canonical_uuid
    from heimdex_assets.search import search_scenes
    from heimdex_assets.settings import resources_from_env

    owner_id = uuid.UUID(canonical_uuid(args.owner_id, "owner id"))
    person_id = uuid.UUID(canonical_uuid(args.person_id, "person id")) if args.person_id else None
    resources = resources_from_env()
    results = search_scenes(
        resources["db"],
        owner_id,
        " ".join(args.query),
        mode=args.mode,
        person_id=person_id,
        limit=args.limit,
        text_embedder=resources["text_embedder"],
        clip=resources["clip"],
        search_index=resources["search_index"],
    )
    return {
        "owner_id": str(owner_id),
        "query": " ".join(args.query),
        "mode": args.mode,
        "person_id": str(person_id) if person_id else None,
        "results": [
            {
                "video_id": str(r.video_id),
                "scene_id": str(r.scene_id),
                "scene_index": r.scene_index,
                "start_s": r.start_s,
                "end_s": r.end_s,
                "score": r.score,
                "ranks": r.ranks,
                "snippet": r.snippet,
            }
            for r in results
        ],
    }


def _print_search(result: dict) -> None:
    hits = result["results"]
    if not hits:
        print("no results")
        return
    for i, r in enumerate(hits, start=1):
        print(
            f"{i:>2}. video {r['video_id']} scene {r['scene_index']:>3} "
            f"[{r['start_s']:.1f}s-{r['end_s']:.1f}s] score {r['score']:.4f}"
        )
        print(f"    {r['snippet']}")


def status(args: argparse.Namespace) -> dict:
    """Per asset: partitions fresh / stale / missing / failed, with the versions and models in force."""
    from heimdex_assets.freshness import STATUS_ASSETS, summarize, video_partition_states
    from heimdex_assets.settings import resources_from_env

    resources = resources_from_env()
    models = {"scene_text_embeddings": resources["text_embedder"].model_id}
    models["scene_clip_embeddings"] = resources["clip"].model_id
    assets = {}
    with resources["db"].engine.connect() as conn:
        for asset_key in STATUS_ASSETS:
            states = video_partition_states(conn, asset_key, models[asset_key])
            step = SPEC.step_for_asset(asset_key)
            assets[asset_key] = {
                "step_version": step.version,
                "model_id": models[asset_key],
                "partitions": summarize(states),
                "stale_items": sum(s.stale_items for s in states.values()),
                "failed_items": sum(s.failed_items for s in states.values()),
            }
    return {"spec_version": LATEST_EMBEDDING_SPEC_VERSION, "assets": assets}


def _print_status(result: dict) -> None:
    print(f"embedding spec {result['spec_version']}")
    print(f"{'asset':<26} {'version':<11} {'fresh':>6} {'stale':>6} {'missing':>8} {'failed':>7}  model")
    for asset_key, a in result["assets"].items():
        p = a["partitions"]
        print(
            f"{asset_key:<26} {a['step_version']:<11} {p['fresh']:>6} {p['stale']:>6} {p['missing']:>8} "
            f"{p['failed']:>7}  {a['model_id']}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heimdex", description="Heimdex Assets: embeddings kept in step with the spec."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="load sample data and materialise the assets for it")
    p.add_argument("--videos-per-owner", type=int, default=7)
    p.add_argument("--scenes", type=int, default=10, help="scenes per video")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=demo, printer=_print_demo)

    p = sub.add_parser("status", help="partitions fresh / stale / missing / failed per asset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=status, printer=_print_status)

    p = sub.add_parser("search", help="search one owner's scenes")
    p.add_argument("query", nargs="*", help="words to search for (optional with --person-id)")
    p.add_argument("--owner-id", required=True)
    p.add_argument("--mode", choices=["lexical", "semantic", "hybrid"], default="hybrid")
    p.add_argument("--person-id", help="rank scenes by how much their people look like this person")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=search, printer=_print_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heimdex`` console script."""
    args = build_parser().parse_args(argv)
    # The CLI reports in its own words (one line each); library warnings stay out of the way.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
    except (CliError, DatabaseUnavailableError, InvalidIdError, SearchError) as exc:
        print(f"heimdex: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("heimdex: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        args.printer(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
