"""What both discovery sensors share: turning keys to add and delete into a sensor result."""

import uuid
from collections.abc import Iterable

import dagster as dg

from heimdex_assets.partitions import InvalidIdError, parse_partition_key

MAX_NEW_PARTITIONS_PER_TICK = 25_000


def ids_of(keys: Iterable[str]) -> list[uuid.UUID]:
    """The UUIDs of ``keys``; a stray key that is no canonical UUID owns no rows and is left out."""
    ids = []
    for key in keys:
        try:
            ids.append(parse_partition_key(key))
        except InvalidIdError:
            continue
    return ids


def discovery_result(
    context: dg.SensorEvaluationContext,
    partitions_def: dg.DynamicPartitionsDefinition,
    had: int,
    to_add: list[str],
    to_delete: list[str],
) -> dg.SensorResult:
    """Add and delete requests for ``partitions_def``, logged; a skip when there is nothing to do."""
    requests = []
    if to_add:
        requests.append(partitions_def.build_add_request(to_add))
    if to_delete:
        requests.append(partitions_def.build_delete_request(to_delete))
    context.log.info(f"{partitions_def.name} partitions: +{len(to_add)} -{len(to_delete)} (had {had})")
    return dg.SensorResult(
        dynamic_partitions_requests=requests,
        skip_reason=None if requests else dg.SkipReason(f"every {partitions_def.name} partition is registered"),
    )
