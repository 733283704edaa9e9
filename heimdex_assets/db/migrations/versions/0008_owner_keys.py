"""Ownership enforced by the schema: every row's ``owner_id`` is its parent's.

Derived rows carry ``owner_id`` (search and reprocessing filter on it) next to the id of the row they
derive from, and nothing tied the two: a scene whose owner differs from its video's landed in another
tenant's search. Each parent gets ``UNIQUE (id, owner_id)`` and each child a composite foreign key
``(parent_id, owner_id) REFERENCES parent (id, owner_id) ON DELETE CASCADE``; where a plain foreign key
on the id existed, the composite one replaces it (it implies it, with the same cascade).

A parent may still move to another owner (a reference photo to another owner's person is a product
case): source rows follow it (a video's scenes, a person's photos: ON UPDATE CASCADE), and the derived
rows of the moved row are deleted in the same statement (a BEFORE UPDATE trigger), to be recomputed
under the new owner; their delete triggers (0004) stamp the old partition, so freshness sees the change.

Existing rows that break the rule fail the upgrade with one line naming each table, the count and a
sample: a migration does not decide which owner tenant data belongs to. The one exception is failure
records of videos that no longer exist (bookkeeping the discovery sensor deletes anyway): they are
deleted, and logged.

Revision ID: 0008_owner_keys
Revises: 0007_reprocess_plans
Create Date: 2026-12-04
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from alembic import op
from sqlalchemy import text

revision = "0008_owner_keys"
down_revision = "0007_reprocess_plans"
branch_labels = None
depends_on = None

log = logging.getLogger("heimdex_assets.db.migrations")


class OwnerKey(NamedTuple):
    """``child.column`` refers to ``parent.id``; ``sample`` names a child row in error messages."""

    child: str
    column: str
    parent: str
    sample: str
    replaces_fkey: bool  # a plain FOREIGN KEY (column) REFERENCES parent(id) exists (0001/0002) and goes
    source: bool = False  # source data, which follows its parent to a new owner; else derived, which goes

    @property
    def name(self) -> str:
        return f"{self.child}_{self.column.removesuffix('_id')}_owner_fkey"

    @property
    def old_name(self) -> str:
        # PostgreSQL's default name for the inline REFERENCES of migrations 0001 and 0002.
        return f"{self.child}_{self.column}_fkey"


PARENTS = ("videos", "scenes", "persons", "person_reference_photos")
SCENE_TABLES = (
    "scene_text_vectors",
    "scene_clip_vectors",
    "scene_person_vectors",
    "scene_person_scans",
    "scene_search_documents",
)
# Parents before children, so the check reports a bad scene before the vectors that copied its owner.
KEYS = (
    OwnerKey("scenes", "video_id", "videos", "id", True, source=True),
    OwnerKey("person_reference_photos", "person_id", "persons", "id", True, source=True),
    *(
        key
        for table in SCENE_TABLES
        for key in (
            OwnerKey(table, "scene_id", "scenes", "scene_id", True),
            OwnerKey(table, "video_id", "videos", "scene_id", False),
        )
    ),
    # video_id is NULL on owner-partitioned steps' failures: MATCH SIMPLE leaves those unchecked.
    OwnerKey("embedding_failures", "video_id", "videos", "item_id", False),
    OwnerKey("person_photo_vectors", "photo_id", "person_reference_photos", "photo_id", True),
    OwnerKey("person_photo_vectors", "person_id", "persons", "photo_id", False),
    OwnerKey("person_query_vectors", "person_id", "persons", "person_id", True),
)

# Deletes the rows derived from the row being moved to another owner; TG_ARGV: (table, column) pairs.
DROP_DERIVED = """
CREATE FUNCTION heimdex_drop_derived_of_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 0 .. TG_NARGS - 1 BY 2 LOOP
        EXECUTE format('DELETE FROM %I WHERE %I = $1 AND owner_id = $2', TG_ARGV[i], TG_ARGV[i + 1])
            USING OLD.id, OLD.owner_id;
    END LOOP;
    RETURN NEW;
END $$;
"""


def _moved_trigger(parent: str) -> str:
    derived = [k for k in KEYS if k.parent == parent and not k.source]
    args = ", ".join(f"'{k.child}', '{k.column}'" for k in derived)
    return (
        f"CREATE TRIGGER {parent}_owner_moved BEFORE UPDATE OF owner_id ON {parent} FOR EACH ROW "
        f"WHEN (OLD.owner_id IS DISTINCT FROM NEW.owner_id) EXECUTE FUNCTION heimdex_drop_derived_of_moved({args})"
    )


def _problems(key: OwnerKey) -> list[str]:
    """What of ``key.child`` the new constraint would refuse: rows of another owner than their parent, rows
    whose parent does not exist; each with a count and a sample."""
    conn = op.get_bind()
    where = (
        f"FROM {key.child} c LEFT JOIN {key.parent} p ON p.id = c.{key.column} "
        f"WHERE c.{key.column} IS NOT NULL AND (p.id IS NULL OR p.owner_id <> c.owner_id)"
    )
    mismatched, orphaned = conn.execute(
        text(f"SELECT count(*) FILTER (WHERE p.id IS NOT NULL), count(*) FILTER (WHERE p.id IS NULL) {where}")
    ).one()
    parent = key.column.removesuffix("_id")
    out = []
    for n, missing, what in (
        (mismatched, False, f"whose owner_id is not their {parent}'s"),
        (orphaned, True, f"whose {parent} does not exist"),
    ):
        if n:
            sample, parent_id, owner = conn.execute(
                text(
                    f"SELECT c.{key.sample}::text, c.{key.column}::text, c.owner_id::text {where} "
                    f"AND (p.id IS NULL) = :missing ORDER BY 1 LIMIT 1"
                ),
                {"missing": missing},
            ).one()
            out.append(
                f"{key.child}: {n} row(s) {what} "
                f"(e.g. {key.sample} {sample}, {key.column} {parent_id}, owner_id {owner})"
            )
    return out


def upgrade() -> None:
    conn = op.get_bind()
    # Failures of deleted videos are no tenant's data, only stale bookkeeping: they go (and are counted).
    gone = conn.execute(
        text(
            "DELETE FROM embedding_failures f WHERE f.video_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM videos v WHERE v.id = f.video_id)"
        )
    ).rowcount

    problems = [p for key in KEYS for p in _problems(key)]
    if problems:
        message = (
            "0008_owner_keys: rows disagree with their parent's owner, fix or delete them and upgrade again "
            "(the migration rewrites no tenant data): " + "; ".join(problems)
        )
        log.error(message)
        raise RuntimeError(message)

    for parent in PARENTS:
        op.execute(f"ALTER TABLE {parent} ADD CONSTRAINT {parent}_id_owner_key UNIQUE (id, owner_id)")
    for key in KEYS:
        if key.replaces_fkey:
            op.execute(f"ALTER TABLE {key.child} DROP CONSTRAINT IF EXISTS {key.old_name}")
        op.execute(
            f"ALTER TABLE {key.child} ADD CONSTRAINT {key.name} FOREIGN KEY ({key.column}, owner_id) "
            f"REFERENCES {key.parent} (id, owner_id) ON DELETE CASCADE" + (" ON UPDATE CASCADE" if key.source else "")
        )
    op.execute(DROP_DERIVED)
    for parent in PARENTS:
        op.execute(_moved_trigger(parent))
    # The cascade from a deleted video looks its failures up by (video_id, owner_id), and their only index on
    # video_id leads with step; the other children's lookups have their primary key or an index to use.
    op.execute(
        "CREATE INDEX embedding_failures_video_owner ON embedding_failures (video_id, owner_id) "
        "WHERE video_id IS NOT NULL"
    )
    if gone:  # said once it holds: a failed upgrade rolls the delete back with everything else
        log.warning("0008_owner_keys: deleted %d embedding_failures row(s) of videos that no longer exist", gone)


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS embedding_failures_video_owner")
    for parent in PARENTS:
        op.execute(f"DROP TRIGGER IF EXISTS {parent}_owner_moved ON {parent}")
    op.execute("DROP FUNCTION IF EXISTS heimdex_drop_derived_of_moved()")
    for key in reversed(KEYS):
        op.execute(f"ALTER TABLE {key.child} DROP CONSTRAINT IF EXISTS {key.name}")
        if key.replaces_fkey:
            op.execute(
                f"ALTER TABLE {key.child} ADD CONSTRAINT {key.old_name} FOREIGN KEY ({key.column}) "
                f"REFERENCES {key.parent} (id) ON DELETE CASCADE"
            )
    for parent in reversed(PARENTS):
        op.execute(f"ALTER TABLE {parent} DROP CONSTRAINT IF EXISTS {parent}_id_owner_key")
