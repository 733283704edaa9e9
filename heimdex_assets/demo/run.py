"""``heimdex demo``: the sample corpus loaded into the configured database, every asset materialised."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from heimdex_assets.db.embedded import default_home
from heimdex_assets.db.tables import (
    embedding_failures,
    person_query_vectors,
    person_reference_photos,
    scene_clip_vectors,
    scene_person_vectors,
    scene_search_documents,
    scene_text_vectors,
    scenes,
    videos,
)
from heimdex_assets.demo.corpus import Corpus, build_corpus, load_corpus
from heimdex_assets.models import configured_models, record_models
from heimdex_assets.resources.blob_store import BlobStore
from heimdex_assets.resources.clip_embedder import TINY_RANDOM_MODEL, ClipEmbedder, ClipWeightsUnavailableError
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION, SPEC


def media_dir() -> Path:
    """Where the demo writes its thumbnails and photos."""
    return default_home() / "demo" / "media"


class DemoError(RuntimeError):
    """Some demo runs failed; the message names the first failure."""


def run_demo(
    videos_per_owner: int = 7,
    scenes_per_video: int = 10,
    say: Callable[[str], None] = print,
    progress: Callable[..., None] | None = None,
) -> dict:
    """Load the corpus, register partitions, materialise the video then the owner assets; a summary.

    ``progress(label, done, total, failed=, scenes=, scenes_total=)`` is called per phase ("videos",
    "owners") before its first run and after each run: partitions done (failed ones included) of
    ``total``, and the scenes of the partitions done (0 for owners)."""
    from heimdex_assets.assets import OWNER_ASSETS, VIDEO_ASSETS
    from heimdex_assets.launch import contiguous_ranges, dagster_instance, materialize_ranges
    from heimdex_assets.partitions import owners_partitions, videos_partitions
    from heimdex_assets.sensors.owner_discovery import plan_owner_partitions
    from heimdex_assets.sensors.video_discovery import plan_video_partitions
    from heimdex_assets.settings import resources_from_env

    started = time.monotonic()
    resources = resources_from_env(deferred=False)
    blobs = resources["blobs"]
    if str(media_dir()) not in blobs.allowed_roots:  # the demo reads the media it writes, whatever else is allowed
        roots = [*blobs.allowed_roots, str(media_dir())]
        resources["blobs"] = BlobStore(allowed_roots=roots, allowed_hosts=blobs.allowed_hosts)
    db = resources["db"]
    embedded = " (embedded)" if not os.environ.get("HEIMDEX_DATABASE_URL") else ""
    say(f"database: {db.describe()}{embedded}")
    say(f"search index: {resources['search_index'].describe()}")

    corpus = build_corpus(media_dir(), videos_per_owner=videos_per_owner, scenes_per_video=scenes_per_video)
    with db.transaction() as conn:
        load_corpus(conn, corpus)
    say(
        f"corpus: {len(corpus.owners)} owners, {len(corpus.videos)} videos, {len(corpus.scenes)} scenes, "
        f"{len(corpus.persons)} persons, {len(corpus.photos)} reference photos (media in {media_dir()})"
    )
    clip, text = resources["clip"], resources["text_embedder"]
    try:
        clip.ensure_loaded()
    except ClipWeightsUnavailableError as exc:
        # The demo asks for placeholder weights, says so once, and records the choice so that later
        # `heimdex status` and `heimdex search` (and workers) agree with it.
        clip = resources["clip"] = ClipEmbedder(model_name=TINY_RANDOM_MODEL, device=clip.device)
        say(f"note: {str(exc).split('; set ')[0]}; the demo uses placeholder CLIP weights ({clip.model_id})")
    with db.transaction() as conn:
        record_models(conn, configured_models(resources, search=False), "heimdex demo")
    say(f"models: text {text.model_id} ({text.resolved_provider}), CLIP {clip.model_id} (recorded for this database)")

    instance = dagster_instance()
    with db.engine.connect() as conn:
        new_videos, _ = plan_video_partitions(conn, set(instance.get_dynamic_partitions(videos_partitions.name)))
        new_owners, _ = plan_owner_partitions(conn, set(instance.get_dynamic_partitions(owners_partitions.name)))
    instance.add_dynamic_partitions(videos_partitions.name, new_videos)
    instance.add_dynamic_partitions(owners_partitions.name, new_owners)

    phases = [
        (VIDEO_ASSETS, videos_partitions.name, {str(v.id) for v in corpus.videos if v.status == "READY"}, "videos"),
        (OWNER_ASSETS, owners_partitions.name, {str(o.id) for o in corpus.owners}, "owners"),
    ]
    outcomes = []
    for assets, partitions_name, wanted, label in phases:
        ranges = contiguous_ranges(instance.get_dynamic_partitions(partitions_name), wanted, 50)
        say(
            f"materialising {', '.join(a.key.to_user_string() for a in assets)} for {len(wanted)} {label} "
            f"in {len(ranges)} run(s)"
        )
        scenes_in = {str(v.id): len(v.scenes) for v in corpus.videos} if label == "videos" else {}
        scenes_total = sum(scenes_in.get(k, 0) for k in wanted)
        done = failed_keys = scenes_done = 0
        if progress:
            progress(label, 0, len(wanted), failed=0, scenes=0, scenes_total=scenes_total)

        def report(
            outcome: object,
            total: int = len(wanted),
            label: str = label,
            scenes_in: dict = scenes_in,
            scenes_total: int = scenes_total,
        ) -> None:
            nonlocal done, failed_keys, scenes_done
            done += len(outcome.keys)
            failed_keys += 0 if outcome.success else len(outcome.keys)
            scenes_done += sum(scenes_in.get(k, 0) for k in outcome.keys)
            if progress:
                progress(label, done, total, failed=failed_keys, scenes=scenes_done, scenes_total=scenes_total)

        outcomes += materialize_ranges(assets, ranges, resources, instance, on_range_done=report)
    failed = [o for o in outcomes if not o.success]
    if failed:
        raise DemoError(f"{len(failed)} run(s) failed; first: {failed[0].error}")
    return summarize_demo(db, corpus) | {
        "dagster_home": os.environ["DAGSTER_HOME"],
        "runs": len(outcomes),
        "search_index_active_version": resources["search_index"].active_version(),
        "seconds": round(time.monotonic() - started, 1),
    }


def summarize_demo(db: object, corpus: Corpus) -> dict:
    """Counts of what the demo's owners now have, per asset, with versions and models."""
    owner_ids = [o.id for o in corpus.owners]
    with db.engine.connect() as conn:

        def count(table: object, *where: object) -> int:
            return int(
                conn.execute(
                    select(func.count()).select_from(table).where(table.c.owner_id.in_(owner_ids), *where)
                ).scalar()
                or 0
            )

        def models(table: object) -> list[str]:
            q = select(table.c.model_id).distinct().where(table.c.owner_id.in_(owner_ids))
            return sorted(conn.execute(q).scalars())

        per_channel = dict(
            conn.execute(
                select(scene_text_vectors.c.channel, func.count())
                .where(scene_text_vectors.c.owner_id.in_(owner_ids))
                .group_by(scene_text_vectors.c.channel)
            ).all()
        )
        photo_status = dict(
            conn.execute(
                select(person_reference_photos.c.status, func.count())
                .where(person_reference_photos.c.owner_id.in_(owner_ids))
                .group_by(person_reference_photos.c.status)
            ).all()
        )
        return {
            "spec_version": LATEST_EMBEDDING_SPEC_VERSION,
            "step_versions": {s.asset_key: s.version for s in SPEC.steps},
            "owners": len(owner_ids),
            "videos": count(videos),
            "videos_ready": count(videos, videos.c.status == "READY"),
            "scenes": count(scenes),
            "vectors": {
                **{f"scene_text/{k}": v for k, v in sorted(per_channel.items())},
                "scene_clip": count(scene_clip_vectors),
                "scene_person (detections)": count(scene_person_vectors),
                "person_photo (READY photos)": photo_status.get("READY", 0),
                "person_query": count(person_query_vectors),
                "scene_search (documents)": count(scene_search_documents),
            },
            "photos_failed": photo_status.get("FAILED", 0),
            "failed_items": count(embedding_failures),
            "models": {
                "text": models(scene_text_vectors),
                "clip": models(scene_clip_vectors),
            },
        }
