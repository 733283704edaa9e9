"""Stale state is visible per partition through a real dagster-webserver's public GraphQL API: what the
Dagster UI's Checks and Partitions tabs read.

One video fresh, one made stale by an edited transcript, one registered but never materialised; the
freshness checks sensor ticks once against the deployment's instance (its run executed as the daemon
would); then the webserver reports, per partition of ``scene_text_embeddings``, the result of its
``fresh`` check (on the companion ``freshness/scene_text_embeddings``) with the state as metadata.
"""

import time

import dagster as dg
import httpx
import pytest
from sqlalchemy import update

from heimdex_assets.assets import VIDEO_ASSETS
from heimdex_assets.checks import CHECK_NAME, check_key
from heimdex_assets.db.tables import scenes
from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex
from heimdex_assets.sensors.freshness_checks import freshness_checks_sensor, record_freshness_checks_job
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.test_backfills import Deployment

ASSET = "scene_text_embeddings"

_CHECK_EXECUTIONS = """
query ($assetKey: AssetKeyInput!, $checkName: String!) {
  assetCheckExecutions(assetKey: $assetKey, checkName: $checkName, limit: 100) {
    partition status runId
    evaluation {
      success severity description partition
      metadataEntries {
        label
        ... on TextMetadataEntry { text }
        ... on IntMetadataEntry { intValue }
      }
    }
  }
}
"""

_CHECK_PARTITION_STATUSES = """
query ($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode {
      assetChecksOrError {
        __typename
        ... on AssetChecks {
          checks {
            name
            partitionStatuses {
              __typename
              ... on AssetCheckDefaultPartitionStatuses {
                succeededPartitions failedPartitions inProgressPartitions skippedPartitions executionFailedPartitions
              }
            }
          }
        }
      }
    }
  }
}
"""

_ASSET_PARTITION_STATUSES = """
query ($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode {
      partitionKeysByDimension { partitionKeys }
      assetPartitionStatuses {
        __typename
        ... on DefaultPartitionStatuses {
          materializedPartitions unmaterializedPartitions failedPartitions materializingPartitions
        }
      }
    }
  }
}
"""


def graphql(deployment: Deployment, query: str, **variables: object) -> dict:
    response = httpx.post(deployment.graphql_url, json={"query": query, "variables": variables}, timeout=30)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


@pytest.fixture
def deployment(tmp_path, database_url, tiny_clip_checkpoint):
    deployment = Deployment(tmp_path, database_url, tiny_clip_checkpoint)
    try:
        yield deployment
    finally:
        deployment.stop()


def test_the_webserver_shows_each_partitions_freshness_fresh_stale_and_missing(deployment, db, rows, resources):
    started = time.monotonic()
    owner = rows.owner()
    fresh, stale, missing = (str(rows.video(owner, n_scenes=2)) for _ in range(3))
    run_resources = resources | {
        "search_index": SearchIndex(sqlite_path=deployment.env["HEIMDEX_SEARCH_SQLITE_PATH"]),
        "person_detector": OpenCvPersonDetector(),
    }
    instance = dg.DagsterInstance.from_config(str(deployment.home))
    materialize_videos(VIDEO_ASSETS, [fresh, stale], run_resources, instance)
    instance.add_dynamic_partitions("videos", [missing])  # registered as discovery would; never materialised
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id == stale, scenes.c.scene_index == 0)
            .values(transcript="The lighthouse keeper polished the lens at dusk.")
        )

    # One tick of the freshness checks sensor, its run executed against the deployment's instance.
    sensor_resources = {k: run_resources[k] for k in ("db", "clip", "text_embedder", "person_detector", "search_index")}
    with dg.build_sensor_context(instance=instance, resources=sensor_resources) as context:
        result = freshness_checks_sensor(context)
    (request,) = result.run_requests
    recorded = record_freshness_checks_job.execute_in_process(run_config=request.run_config, instance=instance)
    assert recorded.success

    deployment.start_webserver()
    key = check_key(ASSET)
    check_asset = {"path": key.asset_key.path}

    # The check's executions, one per partition, each with its evaluation and the state as metadata.
    executions = graphql(deployment, _CHECK_EXECUTIONS, assetKey=check_asset, checkName=CHECK_NAME)
    by_partition = {}
    for execution in executions["assetCheckExecutions"]:
        evaluation = execution["evaluation"]
        metadata = {m["label"]: m.get("text", m.get("intValue")) for m in evaluation["metadataEntries"]}
        assert evaluation["partition"] == execution["partition"]
        assert execution["runId"] == recorded.run_id
        by_partition[execution["partition"]] = (
            execution["status"],
            evaluation["success"],
            evaluation["severity"],
            evaluation["description"],
            metadata,
        )
    assert by_partition == {
        fresh: (
            "SUCCEEDED",
            True,
            "WARN",
            f"{ASSET} partition is fresh",
            {"state": "fresh", "items": 4, "stale_items": 0, "failed_items": 0, "retry_at": ""},
        ),
        stale: (
            "FAILED",
            False,
            "ERROR",
            f"{ASSET} partition is stale",
            # Two scenes, two text channels each: the edited transcript makes one item stale.
            {"state": "stale", "items": 4, "stale_items": 1, "failed_items": 0, "retry_at": ""},
        ),
        missing: (
            "FAILED",
            False,
            "ERROR",
            f"{ASSET} partition is missing",
            {"state": "missing", "items": 4, "stale_items": 4, "failed_items": 0, "retry_at": ""},
        ),
    }

    # The per-partition summary the Checks tab draws: fresh passes, stale and missing fail.
    node = graphql(deployment, _CHECK_PARTITION_STATUSES, assetKey=check_asset)["assetNodeOrError"]
    (check,) = node["assetChecksOrError"]["checks"]
    statuses = check["partitionStatuses"]
    assert (check["name"], statuses["__typename"]) == (CHECK_NAME, "AssetCheckDefaultPartitionStatuses")
    assert statuses["succeededPartitions"] == [fresh]
    assert sorted(statuses["failedPartitions"]) == sorted([stale, missing])
    assert statuses["inProgressPartitions"] == statuses["executionFailedPartitions"] == []

    # And the asset's own Partitions tab: the missing video is the one never materialised.
    node = graphql(deployment, _ASSET_PARTITION_STATUSES, assetKey={"path": [ASSET]})["assetNodeOrError"]
    assert set(node["partitionKeysByDimension"][0]["partitionKeys"]) == {fresh, stale, missing}
    partitions = node["assetPartitionStatuses"]
    assert sorted(partitions["materializedPartitions"]) == sorted([fresh, stale])
    assert partitions["unmaterializedPartitions"] == [missing]
    assert partitions["failedPartitions"] == []
    print(f"webserver staleness test took {time.monotonic() - started:.1f} s")
