"""``scene_search_index``: one BM25 search document per scene, in the index of the search step's version.

Documents are written to ``<prefix>-<version>``; the ledger table ``scene_search_documents``
records, per scene and version, what was indexed (with the document's hash), so freshness is
answered by SQL. The alias that searches read moves to a version only once that version's index
holds every scene of every READY video: until then searches keep using the previous one.
"""

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from sqlalchemy import Connection, and_, select

from heimdex_assets.assets.video_runs import OWNER_SCOPE_TAG, Scene, VideoRun, load_video_run
from heimdex_assets.db.tables import scene_search_documents, scenes, videos
from heimdex_assets.db.vectors import replace_video_rows
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets.resources.search_index import BulkIndexError
from heimdex_assets.spec import SPEC

STEP = SPEC.step("scene_search")


def scene_document(scene: Scene) -> dict[str, Any]:
    """The search document of a scene (its id in the index is ``scene_id``)."""
    return {
        "owner_id": str(scene.owner_id),
        "video_id": str(scene.video_id),
        "scene_id": str(scene.id),
        "scene_index": scene.scene_index,
        "start_s": float(scene.start_s),
        "end_s": float(scene.end_s),
        "transcript": scene.transcript,
        "visual_description": scene.visual_description,
        "tags": list(scene.tags),
        "summary": scene.summary,
    }


def document_sha256(doc: dict[str, Any]) -> str:
    """sha256 of the document's canonical JSON (sorted keys, no spaces), as recorded in the ledger."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def index_is_complete(conn: Connection, version: str, index_name: str) -> bool:
    """Whether every scene of every READY video has a ledger row in ``index_name`` at ``version``."""
    ledger = scene_search_documents
    missing = (
        select(scenes.c.id)
        .join(videos, videos.c.id == scenes.c.video_id)
        .outerjoin(
            ledger,
            and_(
                ledger.c.scene_id == scenes.c.id,
                ledger.c.step_version == version,
                ledger.c.index_name == index_name,
            ),
        )
        .where(videos.c.status == "READY", ledger.c.scene_id.is_(None))
        .exists()
    )
    return not conn.execute(select(missing)).scalar_one()


@dataclass
class IndexingResult:
    """What indexing a run's videos did, and the scenes whose documents could not be indexed."""

    index: str
    documents_upserted: int = 0
    documents_deleted: int = 0
    bulk_retries: int = 0
    complete: bool = False
    alias_active_version: str | None = None
    failed: dict[str, str] = field(default_factory=dict)
    failed_videos: dict[uuid.UUID, list[str]] = field(default_factory=dict)


def index_video_run(db: AppDatabase, search_index: SearchIndex, run: VideoRun, version: str) -> IndexingResult:
    """Index the run's scenes at ``version``, drop removed scenes, write the ledger, move the alias if complete.

    A video with a document that failed for good keeps its old ledger and stale documents, so it
    stays stale; the others are recorded.
    """
    index = search_index.ensure_index(version)
    docs_of = {video_id: [scene_document(s) for s in video_scenes] for video_id, video_scenes in run.scenes_of.items()}
    try:
        report = search_index.upsert_documents(version, [d for docs in docs_of.values() for d in docs])
    except BulkIndexError as exc:
        report = exc.report
    result = IndexingResult(index=index, bulk_retries=report.retries, failed=report.failed)
    result.documents_upserted = report.documents - len(report.failed)
    for video_id, docs in docs_of.items():
        failed = [d["scene_id"] for d in docs if d["scene_id"] in report.failed]
        if failed:
            result.failed_videos[video_id] = failed
    done = {v: docs for v, docs in docs_of.items() if v not in result.failed_videos}

    result.documents_deleted = search_index.delete_video_documents_except(
        version, [str(v) for v in done], [d["scene_id"] for docs in done.values() for d in docs]
    )
    for video_id, docs in done.items():
        with db.transaction() as conn:  # one transaction per partition
            replace_video_rows(
                conn,
                scene_search_documents,
                video_id,
                version,
                [
                    {
                        "scene_id": uuid.UUID(d["scene_id"]),
                        "step_version": version,
                        "video_id": video_id,
                        "owner_id": uuid.UUID(d["owner_id"]),
                        "index_name": index,
                        "input_sha256": document_sha256(d),
                    }
                    for d in docs
                ],
                ["scene_id", "step_version"],
            )

    with db.engine.connect() as conn:
        result.complete = index_is_complete(conn, version, index)
    active = search_index.active_version()
    if result.complete and active != version:
        search_index.activate(version)
        active = version
    result.alias_active_version = active
    return result


@dg.asset(
    key="scene_search_index",
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"opensearch", "postgres"},
    group_name="search",
    deps=["scenes"],
    description=STEP.description,
)
def scene_search_index(
    context: dg.AssetExecutionContext, db: AppDatabase, search_index: SearchIndex
) -> dg.MaterializeResult:
    """One BM25 document per scene of every video in the run; the alias follows once the index is complete."""
    started = time.monotonic()
    with db.engine.connect() as conn:
        run = load_video_run(conn, context.partition_keys, context.run.tags.get(OWNER_SCOPE_TAG))
    for why in run.skipped.values():
        context.log.info(why)

    result = index_video_run(db, search_index, run, STEP.version)

    for video_id, scene_ids in result.failed_videos.items():
        reasons = "; ".join(f"{s}: {result.failed[s]}" for s in scene_ids[:5])
        run.rejected[str(video_id)] = f"{len(scene_ids)} document(s) not indexed in {result.index}: {reasons}"
    if not result.complete:
        context.log.info(f"{result.index} is not complete yet; searches stay on {result.alias_active_version}")
    run.fail_if_rejected()
    return dg.MaterializeResult(
        metadata={
            "videos": len(run.scenes_of),
            "videos_skipped": dg.MetadataValue.json(run.skipped),
            "documents_upserted": result.documents_upserted,
            "documents_deleted": result.documents_deleted,
            "bulk_retries": result.bulk_retries,
            "index": result.index,
            "alias_active_version": result.alias_active_version or "",
            "complete": result.complete,
            "step_version": STEP.version,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
