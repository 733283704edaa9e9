"""The ``heimdex`` command: ``heimdex demo`` (more subcommands join as the product grows).

Every error is one line on stderr with exit status 1 (2 for bad usage); secrets never appear.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections.abc import Sequence

from heimdex_assets.db.engine import DatabaseUnavailableError
from heimdex_assets.partitions import InvalidIdError
from heimdex_assets.search import SearchError
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION, SPEC


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
    """Load the sample corpus into the configured database and materialise every asset for it."""
    from heimdex_assets.demo.run import DemoError, run_demo

    try:
        return run_demo(
            args.videos_per_owner,
            args.scenes,
            say=(lambda _: None) if args.json else (lambda msg: print(msg, flush=True)),
            progress=None if args.json else _progress,
        )
    except DemoError as exc:
        raise CliError(str(exc)) from None


def _print_demo(summary: dict) -> None:
    print("\nHeimdex demo summary")
    print(f"  spec version       {summary['spec_version']}")
    for asset, version in summary["step_versions"].items():
        print(f"  {asset:<28} code version {version}")
    print(f"  owners             {summary['owners']}")
    print(f"  videos             {summary['videos']} ({summary['videos_ready']} READY; the others are skipped)")
    print(f"  scenes             {summary['scenes']}")
    for name, n in summary["vectors"].items():
        print(f"  {name:<28} {n}")
    print(f"  photos FAILED      {summary['photos_failed']}")
    print(f"  failed items       {summary['failed_items']}")
    models = summary["models"]
    print(f"  models             text {', '.join(models['text'])}; clip {', '.join(models['clip'])}")
    print(f"  search index       active version {summary['search_index_active_version']}")
    print(f"  runs               {summary['runs']} (DAGSTER_HOME={summary['dagster_home']})")
    print(f"  time taken         {summary['seconds']} s")


def search(args: argparse.Namespace) -> dict:
    """Search one owner's scenes: lexical, semantic or hybrid, optionally ranked by a person."""
    from heimdex_assets.partitions import canonical_uuid
    from heimdex_assets.search import search_scenes
    from heimdex_assets.settings import resources_from_env

    owner_id = uuid.UUID(canonical_uuid(args.owner_id, "owner id"))
    person_id = uuid.UUID(canonical_uuid(args.person_id, "person id")) if args.person_id else None
    resources = resources_from_env(deferred=False)
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
    from heimdex_assets.freshness import STATUS_ASSETS, partition_states, summarize
    from heimdex_assets.settings import resources_from_env

    resources = resources_from_env(deferred=False)
    clip_model = resources["clip"].model_id
    models = {"scene_text_embeddings": resources["text_embedder"].model_id, "scene_search_index": "bm25"}
    assets = {}
    with resources["db"].engine.connect() as conn:
        for asset_key in STATUS_ASSETS:
            model_id = models.get(asset_key, clip_model)
            states = partition_states(conn, asset_key, model_id)
            assets[asset_key] = {
                "step_version": SPEC.step_for_asset(asset_key).version,
                "model_id": model_id,
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
