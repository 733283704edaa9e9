"""A step, declared once: its items, each item's input identity, and where its rows live.

An item is one thing a model turns into a row (a scene's channel, a thumbnail, a photo, a person,
a scene's search document). ``items_sql`` lists them with the exact input the model sees and its
identity (a sha256 of that input), computed by the database; the asset embeds what it returns,
freshness compares the same identities with the stored rows, and the planner counts them. No
rule about items is written anywhere else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, Table, text

from heimdex_assets.spec import EmbeddingStep

Partitioning = Literal["video", "owner"]

# sha256 of a text's UTF-8 bytes, hex: the identity of every text and URI-derived input.
SHA256_SQL = "encode(sha256(convert_to({}, 'UTF8')), 'hex')"
# Whitespace trimmed; NULL when nothing is left (a blank input is no input).
TRIM_SQL = "nullif(regexp_replace({}, '^[[:space:]]+|[[:space:]]+$', '', 'g'), '')"


def sha256_sql(expr: str) -> str:
    """SQL for the hex sha256 of the text ``expr``."""
    return SHA256_SQL.format(expr)


def trim_sql(expr: str) -> str:
    """SQL for ``expr`` without leading and trailing whitespace, NULL when blank."""
    return TRIM_SQL.format(expr)


def declared_or_uri_sha256(declared: str, uri: str) -> str:
    """Identity of a blob: its declared sha256, else the sha256 of ``uri:<uri>`` (a new URI is a new input)."""
    by_uri = sha256_sql("'uri:' || " + uri)
    return f"coalesce({declared}, {by_uri})"


@dataclass(frozen=True)
class Item:
    """One item of a step: where it belongs, what it is, its input identity and what the model reads."""

    partition_id: uuid.UUID
    owner_id: uuid.UUID
    item_id: str
    input_sha256: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Step:
    """Everything about one step that assets, freshness and the planner share.

    ``items_sql`` yields ``partition_id, owner_id, item_id, input_sha256`` and the payload columns;
    ``{scope}`` is where the narrowing to partitions or an owner goes (on ``partition_column`` and
    ``owner_column``). ``table`` holds one row per done item, ``item_key`` (SQL over alias ``r``)
    names the item of a row; ``extra_tables`` are written with it, rows keyed by the same item.
    ``sources`` are the ``input_stamps`` sources whose change may change the items.
    """

    spec: EmbeddingStep
    partitioning: Partitioning
    items_sql: str
    partition_column: str
    owner_column: str
    table: Table
    item_key: str
    sources: tuple[str, ...]
    extra_tables: tuple[Table, ...] = ()
    upstream: tuple[str, ...] = ()
    # The payload column whose UTF-8 size estimates the model's bill, and whether a cache keyed by
    # (model, input identity) makes items already paid for free (the text step).
    cost_column: str | None = None
    cached_by_identity: bool = False
    # "Missing" means nothing written under the current model identity (search: the current index).
    missing_per_model: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def asset_key(self) -> str:
        return self.spec.asset_key

    @property
    def row_partition_column(self) -> str:
        """The column of ``table`` that holds the partition id."""
        return "video_id" if self.partitioning == "video" else "owner_id"

    def sql_params(self, models: dict[str, str]) -> dict[str, Any]:
        """Bind parameters of this step's SQL under the given model identities (step name → id)."""
        return {
            "step": self.name,
            "version": self.version,
            "model": models[self.name],
            "channels": list(self.spec.enabled_channels),
            **{k: (v(models) if callable(v) else v) for k, v in self.params.items()},
        }

    def scoped_items_sql(self, *, partitions: bool = False, owner: bool = False) -> str:
        """``items_sql`` narrowed to ``:ids`` (partitions) and/or ``:owner``."""
        scope = (f" AND {self.partition_column} = ANY(:ids)" if partitions else "") + (
            f" AND {self.owner_column} = :owner" if owner else ""
        )
        return self.items_sql.format(scope=scope)

    def items(self, conn: Connection, models: dict[str, str], partition_ids: list[uuid.UUID]) -> list[Item]:
        """The items of these partitions, in a stable order, with what the model reads."""
        if not partition_ids:
            return []
        sql = f"SELECT * FROM ({self.scoped_items_sql(partitions=True)}) i ORDER BY partition_id, item_id"
        out = []
        for row in conn.execute(text(sql), self.sql_params(models) | {"ids": partition_ids}).mappings():
            payload = {k: v for k, v in row.items() if k not in ("partition_id", "owner_id", "item_id", "input_sha256")}
            out.append(Item(row["partition_id"], row["owner_id"], row["item_id"], row["input_sha256"], payload))
        return out

    def done_rows(self, conn: Connection, model_id: str, partition_ids: list[uuid.UUID]) -> dict[str, str]:
        """item_id → input identity of the rows these partitions hold under this step's generation."""
        if not partition_ids:
            return {}
        sql = (
            f"SELECT {self.item_key} AS item_id, r.input_sha256 FROM {self.table.name} r "
            f"WHERE r.{self.row_partition_column} = ANY(:ids) AND r.step_version = :version AND r.model_id = :model"
        )
        params = {"ids": partition_ids, "version": self.version, "model": model_id}
        return {r.item_id: r.input_sha256 for r in conn.execute(text(sql), params)}
