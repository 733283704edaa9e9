"""The ``heimdex`` command: ``heimdex demo`` (more subcommands join as the product grows).

Every error is one line on stderr with exit status 1 (2 for bad usage); secrets never appear.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import text

from heimdex_assets.db.engine import DatabaseUnavailableError
from heimdex_assets.generations import ActivationError
from heimdex_assets.models import ModelMismatchError
from heimdex_assets.partitions import InvalidIdError
from heimdex_assets.reprocess import ReprocessError
from heimdex_assets.resources.clip_embedder import ClipWeightsUnavailableError
from heimdex_assets.resources.search_index import SearchIndexError
from heimdex_assets.search import SearchError
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION

# Backfill states that mean every partition ran (older Dagster versions say COMPLETED).
SUCCESS_STATUSES = frozenset({"COMPLETED", "COMPLETED_SUCCESS"})
FAILED_NAMED = 20  # failed partitions named in an error; the rest are counted
WAIT_POLL_S = 2.0  # how often --wait asks the webserver


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _demo_progress() -> Callable[..., None]:
    """The demo's progress callback: one bar per phase (videos, then owners), on stderr."""
    from heimdex_assets.progress import ProgressBar

    bars: dict[str, ProgressBar] = {}

    def progress(label: str, done: int, total: int, *, failed: int, scenes: int, scenes_total: int) -> None:
        if label not in bars:
            bars[label] = ProgressBar(total, label=label, scenes_total=scenes_total or None)
        bars[label].update(done, failed=failed, scenes=scenes if scenes_total else None)
        if done >= total:
            bars[label].close()

    return progress


def demo(args: argparse.Namespace) -> dict:
    """Load the sample corpus into the configured database and materialise every asset for it."""
    from heimdex_assets.demo.run import DemoError, run_demo

    try:
        return run_demo(
            args.videos_per_owner,
            args.scenes,
            say=(lambda _: None) if args.json else (lambda msg: print(msg, flush=True)),
            progress=_demo_progress(),
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


def reprocess(args: argparse.Namespace) -> dict:
    """Plan the reprocessing of a scope, like the seed's CLI, and launch it as backfills on the Dagster
    deployment (``HEIMDEX_DAGSTER_GRAPHQL_URL``), or with --sync run it in this process."""
    from heimdex_assets.backfills import BackfillError, graphql_url_from_env, launch_plan_backfills
    from heimdex_assets.launch import dagster_instance, partition_weights
    from heimdex_assets.models import expected_models
    from heimdex_assets.partitions import canonical_uuid
    from heimdex_assets.progress import ProgressBar
    from heimdex_assets.reprocess import ReprocessRequest, partition_groups, plan_reprocess, run_plan
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env

    if args.timeout is not None and not args.wait:
        raise CliError("--timeout goes with --wait")
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        raise CliError(f"malformed --since {args.since!r}: expected an ISO time such as 2026-01-01T00:00:00") from None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    request = ReprocessRequest(
        scope=args.scope,
        video_id=uuid.UUID(canonical_uuid(args.video_id, "video id")) if args.video_id else None,
        owner_id=uuid.UUID(canonical_uuid(args.owner_id, "owner id")) if args.owner_id else None,
        since=since,
        force=args.force,
        retry_failed=args.retry_failed,
        steps=tuple(args.steps + args.assets) or None,
    )
    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    with resources["db"].engine.connect() as conn:
        plan = plan_reprocess(conn, request, expected_models(conn, resources))
    result = {
        "spec_version": LATEST_EMBEDDING_SPEC_VERSION,
        "scope": request.scope,
        "video_count": plan.video_count,
        "dry_run": args.dry_run,
        "assets": {
            k: {
                "step_version": a.step_version,
                "model_id": a.model_id,
                "partitions": len(a.partitions),
                "states": a.states,
                "items_stale": a.items_stale,
                "items_failed": a.items_failed,
                "selected": a.selected,
                "partitions_left": a.partitions_left,
            }
            for k, a in plan.assets.items()
        },
        "estimated_openai_tokens": plan.estimated_openai_tokens,
        "estimated_openai_cost_usd": plan.estimated_openai_cost_usd,
        "estimate_exact": plan.estimate_exact,
    }
    if args.dry_run or plan.empty:
        fresh = "every selected step is fresh" if request.steps else "every partition is fresh"
        return result | {"message": f"nothing to do: {fresh}" if plan.empty else "plan only"}
    with resources["db"].engine.connect() as conn:
        scenes_per_video = _scene_counts(conn, plan)
        launched_at = conn.execute(text("SELECT now()")).scalar_one()  # the database's clock, as the ledger's
        weights = {kind: partition_weights(conn, kind) for kind in ("video", "owner")}
    if not args.sync:
        url = graphql_url_from_env()
        try:
            launched = launch_plan_backfills(plan, url, weights=weights)
        except BackfillError as exc:
            raise CliError(str(exc)) from None
        ids = ", ".join(b.backfill_id for b in launched)
        result |= {
            "backfills": [
                {"backfill_id": b.backfill_id, "assets": b.asset_keys, "partitions": b.partition_count}
                for b in launched
            ],
            "message": f"launched {len(launched)} backfill(s) with spec {LATEST_EMBEDDING_SPEC_VERSION}: {ids}",
        }
        if not args.wait:
            return result
        statuses = _follow_backfills(url, launched, plan, scenes_per_video, args.timeout)
        for entry in result["backfills"]:
            s = statuses[entry["backfill_id"]]
            entry |= {"status": s["status"], "completed": s["completed"], "failed": s["failed"]}
        unfinished = [s for s in statuses.values() if s["status"] not in SUCCESS_STATUSES or s["failed"]]
        if unfinished:
            with resources["db"].engine.connect() as conn:
                not_redone = _not_redone(conn, plan, launched_at)
            states = ", ".join(f"{s['backfill_id']} {s['status']}" for s in unfinished)
            if not not_redone:  # Dagster counts failures the ledger does not show: say what Dagster says
                n = sum(s["failed"] for s in unfinished)
                raise CliError(
                    f"backfill(s) {states}: {n} asset partition(s) failed; see {_backfill_urls(url, unfinished)}"
                )
            raise CliError(f"backfill(s) {states}: {_name_partitions(not_redone)} not redone")
        return _with_failed_items(
            result | {"message": f"{result['message']}; all completed"}, resources, plan, launched_at
        )
    say = (lambda _: None) if args.json else (lambda msg: print(msg, flush=True))
    say(f"Using embedding spec version: {LATEST_EMBEDDING_SPEC_VERSION}")
    groups = partition_groups(plan)
    bar = ProgressBar(
        sum(len(g.asset_keys) * len(g.partitions) for g in groups),
        scenes_total=sum(scenes_per_video.get(k, 0) for g in groups for k in g.partitions) or None,
    )
    counts = {"done": 0, "failed": 0, "scenes": 0}
    bar.update(0, scenes=0)

    def progress(label: str, outcome: object) -> None:
        n = len(outcome.keys) * len(label.split(", "))  # run_plan's label: the run's assets
        counts["done"] += n
        if outcome.success:
            counts["scenes"] += sum(scenes_per_video.get(k, 0) for k in outcome.keys)
        else:
            counts["failed"] += n
        bar.update(counts["done"], failed=counts["failed"], scenes=counts["scenes"])

    try:
        outcomes = run_plan(plan, resources, dagster_instance(), on_range_done=progress)
    finally:
        bar.close()
    failed = [(label, o) for label, runs in outcomes.items() for o in runs if not o.success]
    result |= {
        "runs": sum(len(r) for r in outcomes.values()),
        "failed_runs": [{"keys": f"{o.keys[0]}..{o.keys[-1]}", "error": o.error} for _, o in failed],
    }
    if failed:
        named = _name_partitions({k: label.split(", ") for label, o in failed for k in o.keys})
        raise CliError(f"{len(failed)} run(s) failed, {named} not redone; first error: {failed[0][1].error}")
    redone = sum(len(a.partitions) for a in plan.assets.values())
    message = (
        f"redid {redone} asset partition(s) across {plan.video_count} video(s) in scope, "
        f"with spec {LATEST_EMBEDDING_SPEC_VERSION}"
    )
    return _with_failed_items(result | {"message": message}, resources, plan, launched_at)


def _with_failed_items(result: dict, resources: dict, plan: object, launched_at: datetime) -> dict:
    """``result`` with the items the reprocess tried and could not embed, named with their reasons in the
    message (``main`` then exits 2: the runs completed, these items did not)."""
    from dataclasses import asdict

    from heimdex_assets.reprocess import describe_failed_items, failed_items

    with resources["db"].engine.connect() as conn:
        items = failed_items(conn, plan, launched_at)
    result["failed_items"] = [asdict(i) for i in items]
    if items:
        result["message"] += f"; {describe_failed_items(items)} (recorded; retried after their backoff)"
    return result


def _scene_counts(conn: object, plan: object) -> dict[str, int]:
    """Scenes per video partition of ``plan`` (the work behind a partition, for scenes/s)."""
    from heimdex_assets.steps import step_for_asset

    keys = sorted(
        {k for key, a in plan.assets.items() if step_for_asset(key).partitioning == "video" for k in a.partitions}
    )
    rows = conn.execute(
        text("SELECT video_id::text, count(*) FROM scenes WHERE video_id = ANY(CAST(:ids AS uuid[])) GROUP BY 1"),
        {"ids": keys},
    )
    return {video: int(n) for video, n in rows}


def _follow_backfills(
    url: str, launched: list, plan: object, scenes_per_video: dict[str, int], timeout_s: float | None
) -> dict[str, dict]:
    """Poll the backfills every ~2 s, with a progress bar, until every one is in a final state; their last
    statuses. Scenes done are counted as a backfill's scenes times the share of its partitions completed."""
    from heimdex_assets.backfills import BackfillError, backfill_status
    from heimdex_assets.progress import ProgressBar

    planned = {b.backfill_id: len(b.asset_keys) * b.partition_count for b in launched}
    scenes_of = {
        b.backfill_id: sum(
            scenes_per_video.get(k, 0)
            for k in (b.partitions or {k for a in b.asset_keys for k in plan.assets[a].partitions})
        )
        for b in launched
    }
    bar = ProgressBar(sum(planned.values()), scenes_total=sum(scenes_of.values()) or None)
    follow = f"they continue on Dagster: follow them at {_backfill_urls(url, launched)}"
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                statuses = {b: backfill_status(url, b) for b in planned}
            except BackfillError as exc:
                raise CliError(f"{exc}; the backfills were launched and {follow}") from None
            totals = {b: max(s["requested"], planned[b]) for b, s in statuses.items()}
            bar.update(
                sum(s["completed"] + s["failed"] for s in statuses.values()),
                failed=sum(s["failed"] for s in statuses.values()),
                scenes=round(sum(scenes_of[b] * s["completed"] / totals[b] for b, s in statuses.items())),
                total=sum(totals.values()),
            )
            if all(s["done"] for s in statuses.values()):
                return statuses
            if deadline is not None and time.monotonic() >= deadline:
                running = ", ".join(b for b, s in statuses.items() if not s["done"])
                raise CliError(f"backfill(s) {running} still running after --timeout {timeout_s:g} s; {follow}")
            time.sleep(WAIT_POLL_S if deadline is None else max(0.0, min(WAIT_POLL_S, deadline - time.monotonic())))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"stopped following the backfills; {follow}") from None
    finally:
        bar.close()


def _backfill_urls(graphql_url: str, backfills: list) -> str:
    """The Dagster UI pages of ``backfills`` (LaunchedBackfills or status dicts)."""
    base = graphql_url.removesuffix("/").removesuffix("/graphql")
    ids = [b.backfill_id if hasattr(b, "backfill_id") else b["backfill_id"] for b in backfills]
    return " ".join(f"{base}/runs/b/{i}" for i in ids)


def _not_redone(conn: object, plan: object, since: datetime) -> dict[str, list[str]]:
    """Per partition of ``plan``, the assets whose ledger shows no write of the plan's generation since
    ``since`` (the launch): what failed, or never ran in a canceled backfill."""
    from heimdex_assets.steps import step_for_asset

    missing: dict[str, list[str]] = {}
    for asset_key, a in plan.assets.items():
        if not a.partitions:
            continue
        written = set(
            conn.execute(
                text(
                    "SELECT partition_id::text FROM partition_ledger WHERE step = :step AND step_version = :version "
                    "AND model_id = :model AND written_at >= :since AND partition_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {
                    "step": step_for_asset(asset_key).name,
                    "version": a.step_version,
                    "model": a.model_id,
                    "since": since,
                    "ids": a.partitions,
                },
            ).scalars()
        )
        for key in a.partitions:
            if key not in written:
                missing.setdefault(key, []).append(asset_key)
    return missing


def _name_partitions(assets_by_partition: dict[str, list[str]]) -> str:
    """``N partition(s): key (assets), ...`` naming the first 20, counting the rest."""
    named = [f"{k} ({', '.join(a)})" for k, a in list(assets_by_partition.items())[:FAILED_NAMED]]
    more = len(assets_by_partition) - len(named)
    return f"{len(assets_by_partition)} partition(s): {', '.join(named)}" + (f" and {more} more" if more else "")


def _print_reprocess(result: dict) -> None:
    print(f"embedding spec {result['spec_version']}, scope {result['scope']}: {result['video_count']} video(s)")
    print(f"{'asset':<26} {'version':<11} {'partitions':>10} {'items':>7} {'failed':>7}  model")
    left_out = {k: a for k, a in result["assets"].items() if not a["selected"]}
    for asset_key, a in result["assets"].items():
        if asset_key not in left_out:
            print(
                f"{asset_key:<26} {a['step_version']:<11} {a['partitions']:>10} {a['items_stale']:>7} "
                f"{a['items_failed']:>7}  {a['model_id']}"
            )
    for asset_key, a in left_out.items():
        n = a["partitions_left"]
        print(f"{asset_key}: {f'{n} partitions stale' if n else 'fresh'}, not redone (not selected)")
    tokens = result["estimated_openai_tokens"]
    how = "" if result["estimate_exact"] else ", partly extrapolated from bytes"
    print(f"estimated OpenAI tokens: {tokens} (about ${result['estimated_openai_cost_usd']:.4f}{how})")
    print(result["message"])


def approve(args: argparse.Namespace) -> dict:
    """Launch a reprocess plan that the spend guard holds for approval: exactly its recorded partitions, as
    backfills on the Dagster deployment, or with --sync in this process."""
    import getpass

    from heimdex_assets.backfills import BackfillError, graphql_url_from_env, launch_plan_backfills
    from heimdex_assets.launch import dagster_instance, partition_weights
    from heimdex_assets.models import expected_models
    from heimdex_assets.partitions import canonical_uuid
    from heimdex_assets.reprocess import run_plan
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env
    from heimdex_assets.spend_guard import SpendGuardError, rebuild
    from heimdex_assets.spend_guard import approve as approve_plan

    plan_id = uuid.UUID(canonical_uuid(args.plan_id, "plan id"))
    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    engine = resources["db"].engine
    with engine.connect() as conn:
        models = expected_models(conn, resources)
        weights = {kind: partition_weights(conn, kind) for kind in ("video", "owner")}
        launched_at = conn.execute(text("SELECT now()")).scalar_one()
    outcomes: dict[str, list] = {}
    url = graphql_url_from_env()

    def launch(plan: object) -> list[str]:
        if args.sync:
            outcomes.update(run_plan(plan, resources, dagster_instance()))
            return []
        return [b.backfill_id for b in launch_plan_backfills(plan, url, weights=weights)]

    try:
        stored = approve_plan(engine, plan_id, f"cli:{getpass.getuser()}", models, launch)
    except (SpendGuardError, BackfillError) as exc:
        raise CliError(str(exc)) from None
    result = {"plan": stored.as_dict()}
    failed = [o for runs in outcomes.values() for o in runs if not o.success]
    if failed:
        raise CliError(f"plan {plan_id} launched; {len(failed)} run(s) failed, first error: {failed[0].error}")
    if args.sync:
        message = f"approved plan {plan_id}: redid {stored.partitions} asset partition(s) in this process"
        return _with_failed_items(result | {"message": message}, resources, rebuild(stored, models), launched_at)
    ids = ", ".join(stored.backfill_ids or [])
    return result | {
        "message": f"approved plan {plan_id}: launched {len(stored.backfill_ids or [])} backfill(s): {ids}"
    }


def rebuild_plan(stored: object, models: dict[str, str]) -> object:
    from heimdex_assets.spend_guard import rebuild

    return rebuild(stored, models)


def search(args: argparse.Namespace) -> dict:
    """Search one owner's scenes: lexical, semantic or hybrid, optionally ranked by a person."""
    from heimdex_assets.partitions import canonical_uuid
    from heimdex_assets.search import search_scenes
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env

    owner_id = uuid.UUID(canonical_uuid(args.owner_id, "owner id"))
    person_id = uuid.UUID(canonical_uuid(args.person_id, "person id")) if args.person_id else None
    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
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
    """Per asset: partitions fresh / stale / missing / failed, with the versions and models in force.

    Reads the app database (and asks the search index for its identity); loads no model."""
    from sqlalchemy import text

    from heimdex_assets.freshness import partition_states, summarize
    from heimdex_assets.generations import (
        active_generations,
        candidate_started,
        generation_dict,
        last_refusal,
        previous_generations,
    )
    from heimdex_assets.models import configured_models, deployment_models
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env
    from heimdex_assets.spend_guard import waiting_plan
    from heimdex_assets.steps import STEPS

    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    configured = configured_models(resources)
    assets = {}
    with resources["db"].engine.connect() as conn:
        models = deployment_models(conn, configured)
        active, previous = active_generations(conn), previous_generations(conn)
        now = conn.execute(text("SELECT now()")).scalar_one()
        for step in STEPS:
            states = partition_states(conn, step, models)
            serving = active.get(step.name)
            is_active = serving is not None and serving.key == (step.version, models[step.name])
            items = sum(s.items for s in states.values())
            stale, failed = sum(s.stale_items for s in states.values()), sum(s.failed_items for s in states.values())
            started = None if is_active else candidate_started(conn, step.name, step.version, models[step.name])
            assets[step.asset_key] = {
                "active_generation": generation_dict(serving),
                "previous_generation": generation_dict(previous.get(step.name)),
                "active_for_s": (now - serving.activated_at).total_seconds() if serving else None,
                "candidate_is_active": is_active,
                "candidate": None
                if is_active
                else {
                    "items": items,
                    "items_done": items - stale - failed,
                    "items_failed": failed,
                    "first_written_s_ago": (now - started).total_seconds() if started else None,
                    "gate_refused": last_refusal(conn, step.name, step.version, models[step.name]),
                },
                "step_version": step.version,
                "model_id": models[step.name],
                "configured_model_id": configured[step.name],
                "partitions": summarize(states),
                "stale_items": sum(s.stale_items for s in states.values()),
                "failed_items": sum(s.failed_items for s in states.values()),
            }
        waiting = waiting_plan(conn)
    return {
        "spec_version": LATEST_EMBEDDING_SPEC_VERSION,
        "assets": assets,
        "waiting_plan": waiting.as_dict() if waiting else None,
    }


def _print_status(result: dict) -> None:
    print(f"embedding spec {result['spec_version']}")
    print(f"{'asset':<26} {'version':<11} {'fresh':>6} {'stale':>6} {'missing':>8} {'failed':>7}  model")
    for asset_key, a in result["assets"].items():
        p = a["partitions"]
        print(
            f"{asset_key:<26} {a['step_version']:<11} {p['fresh']:>6} {p['stale']:>6} {p['missing']:>8} "
            f"{p['failed']:>7}  {a['model_id']}"
        )
    print("\nsearch serves (active generation)")
    for asset_key, a in result["assets"].items():
        g = a["active_generation"]
        serving = f"{g['step_version']} / {g['model_id']}" if g else "nothing yet (no complete generation)"
        if g:
            gate = g.get("evaluation") or {}
            serving += f", active for {_age(a['active_for_s'])}"
            if gate.get("candidate_mrr") is not None:
                serving += f", MRR@10 {gate['candidate_mrr']:.3f}"
        print(f"  {asset_key:<26} {serving}")
        c = a["candidate"]
        if c is not None:
            begun = f", first written {_age(c['first_written_s_ago'])} ago" if c["first_written_s_ago"] else ""
            print(
                f"    candidate {a['step_version']} / {a['model_id']}: {c['items_done']}/{c['items']} items done, "
                f"{c['items_failed']} failed{begun}"
            )
            refused = c["gate_refused"]
            if refused:
                print(
                    f"    refused by the evaluation gate: MRR@10 {refused['candidate_mrr']} vs active "
                    f"{refused['active_mrr']} (margin {refused['margin']}, {refused['queries']} queries); "
                    "`heimdex activate --force` overrides"
                )
    for asset_key, a in result["assets"].items():
        if a["configured_model_id"] != a["model_id"] and not asset_key.startswith("scene_search"):
            print(
                f"note: {asset_key}: this process is configured for {a['configured_model_id']}; "
                "workers so configured refuse to write (`heimdex models use` moves the deployment)"
            )
    waiting = result.get("waiting_plan")
    if waiting:
        print(
            f"\nspend guard: plan {waiting['plan_id']} waits for approval since {waiting['created_at']}: "
            f"{waiting['partitions']} asset partition(s), estimated {waiting['estimated_tokens']:,} OpenAI tokens "
            f"(${waiting['estimated_usd']:.4f}); {waiting['reason']}\n"
            f"  launch it with: heimdex approve {waiting['plan_id']}"
        )


def _age(seconds: float | None) -> str:
    """``seconds`` as a short age: 45s, 12m, 5h, 3d."""
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def models_command(args: argparse.Namespace) -> dict:
    """The model identity each step's rows must carry: the deployment's record and this configuration;
    ``use`` records the configured ones (every step, or ``--step``) as the deployment's."""
    from heimdex_assets.models import RECORDED_STEPS, configured_models, record_models, recorded_models
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env

    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    configured = configured_models(resources, search=False)
    steps = args.step or list(RECORDED_STEPS)
    unknown = [s for s in steps if s not in RECORDED_STEPS]
    if unknown:
        raise CliError(f"unknown step {unknown[0]!r}; steps with a model: {', '.join(RECORDED_STEPS)}")
    with resources["db"].transaction() as conn:
        if args.action == "use":
            record_models(conn, {s: configured[s] for s in steps}, "heimdex models use")
        recorded = recorded_models(conn)
    return {
        "steps": {
            s: {
                "deployment": recorded[s].model_id if s in recorded else None,
                "recorded_by": recorded[s].recorded_by if s in recorded else None,
                "configured": configured[s],
            }
            for s in RECORDED_STEPS
        }
    }


def _print_models(result: dict) -> None:
    print(f"{'step':<14} {'deployment expects':<52} configured here")
    for step, m in result["steps"].items():
        same = "" if m["deployment"] in (None, m["configured"]) else "   (differs)"
        print(f"{step:<14} {m['deployment'] or '(not recorded yet)':<52} {m['configured']}{same}")


def generation_command(args: argparse.Namespace) -> dict:
    """``heimdex activate STEP [--force]`` / ``heimdex rollback STEP``: flip what a step's searches read."""
    from heimdex_assets.assets.scene_search import align_alias
    from heimdex_assets.generations import activate, rollback
    from heimdex_assets.models import expected_models
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env
    from heimdex_assets.steps import step as step_named

    try:
        step = step_named(args.step)
    except KeyError as exc:
        raise CliError(str(exc.args[0])) from None
    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    actor, reason = "heimdex cli", args.reason or f"heimdex {args.action}"
    with resources["db"].transaction() as conn:
        if args.action == "activate":
            models = expected_models(conn, resources)
            flipped = activate(conn, step, models, actor=actor, reason=reason, force=args.force, resources=resources)
        else:
            flipped = rollback(conn, step.name, actor=actor, reason=reason)
    if step.name == "scene_search":
        align_alias(resources["db"], resources["search_index"])
    if flipped is None:
        return {"step": step.name, "changed": False, "message": f"{step.name}: the candidate is already active"}
    gate = flipped.evaluation
    measured = f" (MRR@10 {gate['candidate_mrr']} vs {gate['active_mrr']})" if gate else ""
    return {
        "step": step.name,
        "changed": True,
        "active": {"step_version": flipped.version, "model_id": flipped.model_id},
        "evaluation": gate,
        "message": f"{step.name}: searches now read {flipped.version} / {flipped.model_id}{measured}",
    }


def prune_command(args: argparse.Namespace) -> dict:
    """``heimdex prune``: delete generations older than the previous one, past the grace period."""
    from datetime import timedelta

    from heimdex_assets.generations import prunable_generations, prune
    from heimdex_assets.models import expected_models
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env

    if args.grace_days < 0:
        raise CliError("--grace-days must be 0 or more")
    grace = timedelta(days=args.grace_days)
    resources = follow_recorded_placeholder(resources_from_env(deferred=False))
    with resources["db"].engine.connect() as conn:
        models = expected_models(conn, resources)
        if args.dry_run:
            found = prunable_generations(conn, models, grace)
            listed = [{"step": g.step, "step_version": g.version, "model_id": g.model_id} for g in found]
            return {"dry_run": True, "generations": listed, "message": f"{len(listed)} generation(s) to prune"}
    report = prune(resources["db"], resources["search_index"], models, grace)
    rows = sum(r["rows_deleted"] for r in report)
    return {"dry_run": False, "generations": report, "message": f"pruned {len(report)} generation(s), {rows} rows"}


def _print_prune(result: dict) -> None:
    for g in result["generations"]:
        print(f"  {g['step']:<14} {g['step_version']:<11} {g['model_id']}  {g.get('rows_deleted', '')}")
    print(result["message"])


def clip_server_command(args: argparse.Namespace) -> dict:
    """``heimdex clip-server``: serve the configured CLIP model over HTTP until interrupted (Ctrl+C)."""
    import os

    from heimdex_assets.resources.clip_server import TOKEN_ENV, ClipServer, is_loopback
    from heimdex_assets.settings import clip_from_env

    configured = clip_from_env()
    # The server embeds with the local model: a HEIMDEX_CLIP_URL in its environment names itself, not a model.
    local = {name: getattr(configured, name) for name in type(configured).model_fields}
    clip = type(configured)(**(local | {"remote_url": None, "remote_token": None}))
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if args.max_body_mb <= 0:
        raise CliError("--max-body-mb must be more than 0")
    try:
        server = ClipServer(clip, args.host, args.port, token=token, max_body_bytes=int(args.max_body_mb * 2**20))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or type(exc).__name__}") from None
    auth = f"bearer token from {TOKEN_ENV}" if token else f"no token (set {TOKEN_ENV} to require one)"
    print(f"heimdex clip-server: {clip.model_id} on {clip.device_kind} at {server.url}, {auth}", flush=True)
    if token is None and not is_loopback(args.host):
        print(f"heimdex clip-server: warning: {args.host} is not loopback and no token is required", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return {"url": server.url, "model_id": clip.model_id, "message": "heimdex clip-server: stopped"}


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

    p = sub.add_parser("reprocess", help="redo what the current spec makes stale, for a video, an owner or all")
    p.add_argument("--scope", choices=["video", "owner", "all"], required=True)
    p.add_argument("--video-id")
    p.add_argument("--owner-id")
    p.add_argument("--since", help="only videos updated at or after this ISO time")
    p.add_argument("--force", action="store_true", help="redo every partition of the scope, fresh or not")
    p.add_argument("--retry-failed", action="store_true", help="also retry items that failed recently")
    p.add_argument(
        "--step",
        dest="steps",
        action="append",
        default=[],
        metavar="NAME",
        help="only this step and the steps downstream of it (repeatable); e.g. scene_text",
    )
    p.add_argument(
        "--asset",
        dest="assets",
        action="append",
        default=[],
        metavar="KEY",
        help="only the step producing this asset and its downstream (repeatable); e.g. scene_text_embeddings",
    )
    p.add_argument("--dry-run", action="store_true", help="show the plan (partitions, items, OpenAI estimate)")
    p.add_argument(
        "--sync", action="store_true", help="run in this process, with progress (default: launch backfills on Dagster)"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the launched backfills to their end with a progress bar; exit 1 naming the partitions not redone",
    )
    p.add_argument("--timeout", type=float, help="with --wait: stop following after this many seconds (exit 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=reprocess, printer=_print_reprocess)

    p = sub.add_parser("approve", help="launch a reprocess plan the spend guard holds for approval (see `status`)")
    p.add_argument("plan_id")
    p.add_argument("--sync", action="store_true", help="run it in this process instead of as Dagster backfills")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=approve, printer=lambda r: print(r["message"]))

    p = sub.add_parser("status", help="partitions fresh / stale / missing / failed per asset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=status, printer=_print_status)

    for action, text_ in (
        ("activate", "make a step's candidate generation the one searches read (full coverage, or --force)"),
        ("rollback", "make a step's previous generation the one searches read again"),
    ):
        p = sub.add_parser(action, help=text_)
        p.add_argument("step", help="scene_text, scene_clip, scene_person, scene_search, person_photo or person_query")
        if action == "activate":
            p.add_argument("--force", action="store_true", help="activate below full coverage")
        p.add_argument("--reason", help="why (kept with the flip)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=generation_command, printer=lambda r: print(r["message"]), action=action, force=False)

    p = sub.add_parser("prune", help="delete generations older than the previous one, past the grace period")
    p.add_argument("--grace-days", type=float, default=7.0, help="idle this long before pruning (default 7)")
    p.add_argument("--dry-run", action="store_true", help="list what would be pruned")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=prune_command, printer=_print_prune)

    p = sub.add_parser("models", help="the model each step's rows must carry; `use` records the configured ones")
    p.add_argument("action", nargs="?", choices=["show", "use"], default="show")
    p.add_argument("--step", action="append", help="only this step (repeatable; with `use`)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=models_command, printer=_print_models)

    p = sub.add_parser("search", help="search one owner's scenes")
    p.add_argument("query", nargs="*", help="words to search for (optional with --person-id)")
    p.add_argument("--owner-id", required=True)
    p.add_argument("--mode", choices=["lexical", "semantic", "hybrid"], default="hybrid")
    p.add_argument("--person-id", help="rank scenes by how much their people look like this person")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=search, printer=_print_search)

    p = sub.add_parser("clip-server", help="serve the configured CLIP model over HTTP (for HEIMDEX_CLIP_URL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    p.set_defaults(handler=clip_server_command, printer=lambda r: print(r["message"]), json=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heimdex`` console script."""
    args = build_parser().parse_args(argv)
    # The CLI reports in its own words (one line each); library warnings stay out of the way.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.handler(args)
    except (
        CliError,
        DatabaseUnavailableError,
        InvalidIdError,
        SearchError,
        ReprocessError,
        ModelMismatchError,
        ClipWeightsUnavailableError,
        SearchIndexError,
        ActivationError,
    ) as exc:
        print(f"heimdex: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"heimdex: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        args.printer(result)
    return 2 if result.get("failed_items") else 0  # done, but items failed (named in the message)


if __name__ == "__main__":
    sys.exit(main())
