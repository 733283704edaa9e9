"""Launching a reprocessing plan on a Dagster deployment, as asset backfills, through its webserver.

``launch_plan_backfills`` sends, per group of assets that redo the same partitions, one backfill
per run's worth of work (about ``scenes_per_run()`` scenes, ``launch.pack_runs``), tagged with the
plan's owner scope and ``force``. Partitions the discovery sensors have not registered yet are added
first, as the sensors would. ``backfill_status`` reports a backfill's progress. Both speak the
GraphQL API of dagster-webserver (schema checked against dagster-graphql 1.13.27).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN, pack_runs, scenes_per_run
from heimdex_assets.partitions import owners_partitions, videos_partitions
from heimdex_assets.reprocess import PartitionGroup, ReprocessPlan, partition_groups, plan_tags
from heimdex_assets.runs import OWNER_SCOPE_TAG
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION

GRAPHQL_URL_ENV = "HEIMDEX_DAGSTER_GRAPHQL_URL"
DEFAULT_GRAPHQL_URL = "http://127.0.0.1:3000/graphql"
# Backfill states after which nothing more will run.
FINAL_STATUSES = frozenset({"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"})
_PARTITIONS_DEFS = {"video": videos_partitions, "owner": owners_partitions}
_ADD_BATCH = 100  # partitions added per request, as aliased mutations

_LAUNCH = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PartitionKeysNotFoundError { partitionKeys }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""
_REPOSITORY = """
query AssetRepository($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) { repository { name location { name } } }
}
"""
_IN_PROGRESS = """
query BackfillsInProgress {
  partitionBackfillsOrError(status: REQUESTED, limit: 1000) {
    __typename
    ... on PartitionBackfills { results { id partitionNames assetSelection { path } } }
    ... on Error { message }
  }
}
"""
_STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status
      numPartitions
      tags { key value }
      error { message }
      assetBackfillData {
        assetBackfillStatuses {
          ... on AssetPartitionsStatusCounts {
            assetKey { path }
            numPartitionsTargeted
            numPartitionsInProgress
            numPartitionsMaterialized
            numPartitionsFailed
          }
        }
      }
    }
    ... on Error { message }
  }
}
"""


class BackfillError(RuntimeError):
    """The deployment could not be reached or refused the request; the message is one line."""


class BackfillNotFoundError(BackfillError):
    """The deployment has no backfill of that id."""


@dataclass(frozen=True)
class LaunchedBackfill:
    """One backfill sent to the deployment: its id, the assets it materialises, over how many partitions."""

    backfill_id: str
    asset_keys: list[str]
    partition_count: int
    partitions: list[str] = field(default_factory=list)


def graphql_url_from_env() -> str:
    """``HEIMDEX_DAGSTER_GRAPHQL_URL``, or the local webserver's default address."""
    return os.environ.get(GRAPHQL_URL_ENV, "").strip() or DEFAULT_GRAPHQL_URL


def launch_plan_backfills(
    plan: ReprocessPlan,
    graphql_url: str,
    *,
    weights: Mapping[str, Mapping[str, int]] | None = None,
    timeout_s: float = 30,
) -> list[LaunchedBackfill]:
    """Launch ``plan`` on the deployment at ``graphql_url``: per partition group, one asset backfill per
    run's worth of scenes (``weights``: partitioning → partition key → scenes; without them, one
    backfill per group, which the daemon cuts by the assets' backfill policy)."""
    tags = [{"key": k, "value": v} for k, v in plan_tags(plan).items()]
    scope = f"owner {plan.owner_scope}" if plan.owner_scope else "all owners"
    launched = []
    slices = []
    for group in partition_groups(plan):
        if weights is None:
            slices.append((group, group.partitions))
            continue
        keys = group.partitions
        for part in pack_runs(
            keys, set(keys), weights[group.partitioning], scenes_per_run(), MAX_PARTITIONS_PER_RUN, max_bridged=0
        ):
            slices.append((group, part))
    with _Client(graphql_url, timeout_s) as client:
        for group, partitions in slices:
            params = {
                "assetSelection": [{"path": [k]} for k in group.asset_keys],
                "partitionNames": partitions,
                "tags": tags,
                "description": f"heimdex reprocess, {scope}, embedding spec {LATEST_EMBEDDING_SPEC_VERSION}",
            }
            result = client.launch(params)
            if result["__typename"] == "PartitionKeysNotFoundError":
                # Not discovered yet (the sensors run every 30 s): register them, as the sensor would.
                client.add_partitions(group, result["partitionKeys"])
                result = client.launch(params)
            if result["__typename"] != "LaunchBackfillSuccess":
                # The groups already launched run regardless: say which, so that nobody launches them twice.
                already = f" (launched before it: {', '.join(b.backfill_id for b in launched)})" if launched else ""
                raise BackfillError(f"Dagster refused the backfill: {_error_message(result)}{already}")
            launched.append(LaunchedBackfill(result["backfillId"], group.asset_keys, len(partitions), list(partitions)))
    return launched


def backfill_status(graphql_url: str, backfill_id: str, *, timeout_s: float = 30) -> dict:
    """A backfill's status and, per asset and in total, its partitions requested / in progress /
    completed / failed (totals count asset partitions: two assets over 3 videos request 6)."""
    with _Client(graphql_url, timeout_s) as client:
        found = client.execute(_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
    if found["__typename"] == "BackfillNotFoundError":
        raise BackfillNotFoundError(f"Dagster has no backfill {backfill_id}")
    if found["__typename"] != "PartitionBackfill":
        raise BackfillError(f"Dagster could not read the backfill {backfill_id}: {_error_message(found)}")
    assets = {
        "/".join(s["assetKey"]["path"]): {
            "requested": s["numPartitionsTargeted"],
            "in_progress": s["numPartitionsInProgress"],
            "completed": s["numPartitionsMaterialized"],
            "failed": s["numPartitionsFailed"],
        }
        for s in (found["assetBackfillData"] or {}).get("assetBackfillStatuses", [])
        if "assetKey" in s  # partitioned assets only; ours all are
    }
    totals = {n: sum(a[n] for a in assets.values()) for n in ("requested", "in_progress", "completed", "failed")}
    return {
        "backfill_id": backfill_id,
        "status": found["status"],
        "done": found["status"] in FINAL_STATUSES,
        "partitions": found["numPartitions"],
        "assets": assets,
        **totals,
        "error": _first_line(found["error"]["message"]) if found["error"] else None,
        "owner_scope": next((t["value"] for t in found.get("tags") or [] if t["key"] == OWNER_SCOPE_TAG), None),
    }


def backfills_in_progress(graphql_url: str, *, timeout_s: float = 30) -> dict[str, set[tuple[str, str]]]:
    """Per asset backfill still in progress on the deployment (any launcher: the API, the CLI, the stale
    sensor, the UI), the (asset, partition) pairs it targets."""
    with _Client(graphql_url, timeout_s) as client:
        found = client.execute(_IN_PROGRESS, {})["partitionBackfillsOrError"]
    if found["__typename"] != "PartitionBackfills":
        raise BackfillError(f"Dagster could not list its backfills: {_error_message(found)}")
    return {
        b["id"]: {("/".join(a["path"]), p) for a in b["assetSelection"] or () for p in b["partitionNames"] or ()}
        for b in found["results"]
    }


class _Client:
    """A GraphQL client of one webserver whose failures are one-line BackfillErrors."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.shown_url = _without_password(url)
        self._http = httpx.Client(timeout=timeout_s)

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def execute(self, query: str, variables: dict) -> dict:
        try:
            response = self._http.post(self.url, json={"query": query, "variables": variables})
        except httpx.HTTPError as exc:
            raise BackfillError(
                f"cannot reach the Dagster webserver at {self.shown_url}: {type(exc).__name__}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if body.get("errors"):  # a query this schema rejects: another Dagster version, or no webserver
            message = _first_line(body["errors"][0].get("message", ""))
            raise BackfillError(f"the Dagster webserver at {self.shown_url} rejected the request: {message}")
        if response.status_code != 200 or not isinstance(body.get("data"), dict):
            raise BackfillError(
                f"the Dagster webserver at {self.shown_url} answered HTTP {response.status_code} without GraphQL data"
            )
        return body["data"]

    def launch(self, params: dict) -> dict:
        return self.execute(_LAUNCH, {"params": params})["launchPartitionBackfill"]

    def add_partitions(self, group: PartitionGroup, keys: Sequence[str]) -> None:
        """Register ``keys`` in the group's dynamic partitions, in the repository defining its assets."""
        nodes = self.execute(_REPOSITORY, {"keys": [{"path": [group.asset_keys[0]]}]})["assetNodes"]
        if not nodes:
            raise BackfillError(
                f"the Dagster deployment at {self.shown_url} has no asset {group.asset_keys[0]}: "
                "is the heimdex_assets code location loaded?"
            )
        repository = nodes[0]["repository"]
        selector = {"repositoryName": repository["name"], "repositoryLocationName": repository["location"]["name"]}
        partitions_def = _PARTITIONS_DEFS[group.partitioning].name
        for start in range(0, len(keys), _ADD_BATCH):
            batch = list(keys[start : start + _ADD_BATCH])
            # One request per batch: top-level mutations run one after the other, each its own result.
            fields = "\n".join(
                f"p{i}: addDynamicPartition(repositorySelector: $repo, partitionsDefName: $def, partitionKey: $k{i})"
                " { __typename ... on Error { message } }"
                for i in range(len(batch))
            )
            declared = "".join(f", $k{i}: String!" for i in range(len(batch)))
            query = f"mutation AddPartitions($repo: RepositorySelector!, $def: String!{declared}) {{\n{fields}\n}}"
            variables = {"repo": selector, "def": partitions_def} | {f"k{i}": key for i, key in enumerate(batch)}
            data = self.execute(query, variables)
            for i, key in enumerate(batch):
                # A duplicate was added meanwhile by the discovery sensor: what we wanted.
                if data[f"p{i}"]["__typename"] not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
                    message = _error_message(data[f"p{i}"])
                    raise BackfillError(f"cannot add the {partitions_def} partition {key} to Dagster: {message}")


def _error_message(result: dict) -> str:
    if result.get("errors"):  # run config validation
        return _first_line(result["errors"][0]["message"])
    return _first_line(result.get("message") or result["__typename"])


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "")


def _without_password(url: str) -> str:
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=parsed.username, password="***")) if parsed.password else url
