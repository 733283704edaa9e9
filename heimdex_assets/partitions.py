"""The two partitionings of the project, defined once: by video and by owner (both UUIDs)."""

from __future__ import annotations

import uuid

import dagster as dg

videos_partitions = dg.DynamicPartitionsDefinition(name="videos")
owners_partitions = dg.DynamicPartitionsDefinition(name="owners")


class InvalidIdError(ValueError):
    """An id that is not a UUID in canonical lowercase form."""


def canonical_uuid(value: str, what: str = "id") -> str:
    """``value`` as a canonical lowercase UUID string; InvalidIdError with the bad value otherwise."""
    try:
        parsed = uuid.UUID(str(value).strip())
    except (ValueError, AttributeError, TypeError):
        raise InvalidIdError(
            f"malformed {what} {value!r}: expected a UUID such as '3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70'"
        ) from None
    return str(parsed)


def parse_partition_key(key: str, what: str = "video id") -> uuid.UUID:
    """The UUID of a partition key, which must already be canonical (lowercase, hyphenated)."""
    canonical = canonical_uuid(key, what)
    if canonical != key:
        raise InvalidIdError(f"partition key {key!r} is not canonical; use {canonical!r}")
    return uuid.UUID(canonical)
