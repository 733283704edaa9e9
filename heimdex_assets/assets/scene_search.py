"""``scene_search_index``: one BM25 search document per scene, in the index of the search step's version.

Documents are written to ``<prefix>-<version>``; the ledger table ``scene_search_documents`` records,
per scene, which index (by its identity) holds which document (by its hash), so freshness is answered
by SQL and a wiped or recreated index counts as missing. The alias that searches read moves to a
version only once that version's index holds every scene of every READY video.
"""

import dagster as dg
from sqlalchemy import Connection, and_, select

from heimdex_assets.db.tables import scene_search_documents, scenes, videos
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets.resources.search_index import BulkIndexError
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import SCENE_SEARCH as STEP


def index_is_complete(conn: Connection, version: str, index_identity: str) -> bool:
    """Whether every scene of every READY video has a document in the index ``index_identity``."""
    ledger = scene_search_documents
    missing = (
        select(scenes.c.id)
        .join(videos, videos.c.id == scenes.c.video_id)
        .outerjoin(
            ledger,
            and_(
                ledger.c.scene_id == scenes.c.id,
                ledger.c.step_version == version,
                ledger.c.model_id == index_identity,
            ),
        )
        .where(videos.c.status == "READY", ledger.c.scene_id.is_(None))
        .exists()
    )
    return not conn.execute(select(missing)).scalar_one()


@dg.asset(
    key=STEP.asset_key,
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    kinds={"opensearch", "postgres"},
    group_name="search",
    deps=["scenes"],
    description=STEP.spec.description,
)
def scene_search_index(
    context: dg.AssetExecutionContext, db: AppDatabase, search_index: SearchIndex
) -> dg.MaterializeResult:
    """One BM25 document per scene of every video in the run; the alias follows once the index is complete."""
    index = search_index.ensure_index(STEP.version)
    identity = search_index.index_identity(STEP.version)
    counts = {"documents_upserted": 0, "documents_deleted": 0, "bulk_retries": 0}

    def compute(batch: Batch) -> dict[str, ItemOutput]:
        try:
            report = search_index.upsert_documents(STEP.version, [i.payload["document"] for i in batch.todo])
        except BulkIndexError as exc:  # the documents that failed for good are failures; the rest are in
            report = exc.report
        counts["documents_upserted"] = report.documents - len(report.failed)
        counts["bulk_retries"] = report.retries
        # Documents of scenes that are gone (deleted, or their video no longer READY) leave the index.
        counts["documents_deleted"] = search_index.delete_video_documents_except(
            STEP.version, [str(p) for p in batch.partition_ids], [str(i.payload["scene_id"]) for i in batch.items]
        )
        return {
            i.item_id: ItemOutput(error=f"not indexed in {index}: {report.failed[i.item_id]}")
            if i.item_id in report.failed
            else ItemOutput(rows={STEP.table.name: [{"scene_id": i.payload["scene_id"], "index_name": index}]})
            for i in batch.todo
        }

    run = run_step(context, db, STEP, {STEP.name: identity}, compute)
    with db.engine.connect() as conn:
        complete = index_is_complete(conn, STEP.version, identity)
    active = search_index.active_version()
    if complete and active != STEP.version:
        search_index.activate(STEP.version)
        active = STEP.version
    if not complete:
        context.log.info(f"{index} is not complete yet; searches stay on {active}")
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(
        metadata=run.metadata(index=index, complete=complete, alias_active_version=active or "", **counts)
    )
