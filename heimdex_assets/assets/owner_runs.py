"""What every owner-partitioned asset does first: resolve the run's ``owners`` keys to owners."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, select

from heimdex_assets.assets.video_runs import raise_for_rejected
from heimdex_assets.db.tables import owners
from heimdex_assets.partitions import InvalidIdError, parse_partition_key


@dataclass
class OwnerRun:
    """The known owners of a run, and the keys that could not be processed and why."""

    owner_ids: list[uuid.UUID] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    def fail_if_rejected(self) -> None:
        """Raise once the good partitions are written, naming every key that could not be done."""
        raise_for_rejected(self.rejected)


def load_owner_run(conn: Connection, keys: Sequence[str], owner_scope: str | None = None) -> OwnerRun:
    """Validate ``owners`` partition keys against the owners table and the run's owner scope."""
    run = OwnerRun()
    ids: dict[uuid.UUID, str] = {}
    for key in keys:
        try:
            ids[parse_partition_key(key, "owner id")] = key
        except InvalidIdError as exc:
            run.rejected[key] = str(exc)
    known = set(conn.execute(select(owners.c.id).where(owners.c.id.in_(list(ids)))).scalars())
    scope = uuid.UUID(owner_scope) if owner_scope else None
    for owner_id, key in ids.items():
        if owner_id not in known:
            run.rejected[key] = f"unknown owner {key}"
        elif scope is not None and owner_id != scope:
            run.rejected[key] = f"owner {key} is not in the scope of owner {scope}"
        else:
            run.owner_ids.append(owner_id)
    run.owner_ids.sort()
    return run
