"""``scene_search_index``: one BM25 search document per scene, in the index of the search step's version.

Documents are written to ``<prefix>-<version>``; the ledger table ``scene_search_documents`` records,
per scene, which index (by its identity) holds which document (by its hash), so freshness is answered
by SQL and a wiped or recreated index counts as missing. The alias that searches read follows the
active search generation (``heimdex_assets.generations``): it moves once the new index covers every
partition, or on ``heimdex activate``/``rollback``.
"""

import dagster as dg

from heimdex_assets.generations import Generation, active_generations
from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets.resources.search_index import BulkIndexError
from heimdex_assets.runs import Batch, ItemOutput, raise_for_rejected, run_step
from heimdex_assets.steps import SCENE_SEARCH as STEP


def align_alias(db: AppDatabase, search_index: SearchIndex) -> tuple[Generation | None, str | None]:
    """Point the alias that lexical search reads at the active search generation's index (one atomic
    call). Returns that generation and the version the alias points at; before a first complete index,
    the alias stays where it is."""
    with db.engine.connect() as conn:
        active = active_generations(conn).get(STEP.name)
    current = search_index.active_version()
    if active is not None and active.version != current and search_index.index_identity(active.version):
        search_index.activate(active.version)
        current = active.version
    return active, current


@dg.asset(
    key=STEP.asset_key,
    partitions_def=videos_partitions,
    code_version=STEP.version,
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTITIONS_PER_RUN),
    kinds={"opensearch", "postgres"},
    # The client retries transient errors; this covers OpenSearch down for longer (a restart): retries at ~10 s, ~30 s
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS),
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
    serving, active = align_alias(db, search_index)
    complete = serving is not None and serving.key == (STEP.version, identity)  # this index serves searches
    if not complete:
        context.log.info(f"{index} does not cover every scene yet; searches stay on {active}")
    raise_for_rejected(run.partitions.rejected)
    return dg.MaterializeResult(
        metadata=run.metadata(index=index, complete=complete, alias_active_version=active or "", **counts)
    )
