"""Freshness by ledger and input stamps; the model in every row's key; the deployment's models.

- ``input_stamps``: per partition (video or owner) and source, the id of the last transaction that
  changed the source rows of that partition, kept by statement triggers. A partition whose stamp
  was not visible in the snapshot a run read its items under has changed since.
- ``partition_ledger``: per step, partition and generation (step version, model identity), what the
  run that wrote it read (its snapshot) and found (items, failures, when a failure may be retried),
  and its own transaction (its writes to derived rows are no change; anyone else's are).
- Every derived row's primary key includes ``model_id``, so two models never overwrite each other.
- ``embedding_failures`` gains the model in its key, the partition, and ``retry_at`` (backoff).
- ``step_models``: the model identity the deployment expects per step.

Revision ID: 0004_ledger_and_stamps
Revises: 0003_scene_updated_at
Create Date: 2026-11-29
"""

from alembic import op

revision = "0004_ledger_and_stamps"
down_revision = "0003_scene_updated_at"
branch_labels = None
depends_on = None

# (table, its current primary key columns without model_id)
KEYED_TABLES = (
    ("scene_text_vectors", "scene_id, channel, step_version"),
    ("scene_clip_vectors", "scene_id, step_version"),
    ("scene_person_vectors", "scene_id, step_version, detection_index"),
    ("scene_person_scans", "scene_id, step_version"),
    ("person_photo_vectors", "photo_id, step_version"),
    ("person_query_vectors", "person_id, step_version"),
    ("scene_search_documents", "scene_id, step_version"),
)

# One statement trigger per table and event: transition tables name the rows that changed.
STAMP_TRIGGERS = """
CREATE TABLE input_stamps (
    partition_id uuid NOT NULL,
    source text NOT NULL,
    changed_xid xid8 NOT NULL,
    PRIMARY KEY (partition_id, source)
);

CREATE FUNCTION heimdex_stamp(partition_ids uuid[], source text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO input_stamps (partition_id, source, changed_xid)
    SELECT DISTINCT p, source, pg_current_xact_id() FROM unnest(partition_ids) p WHERE p IS NOT NULL
    ORDER BY 1  -- a fixed lock order: concurrent writers never deadlock on stamps
    ON CONFLICT (partition_id, source) DO UPDATE SET changed_xid = EXCLUDED.changed_xid
$$;

CREATE FUNCTION heimdex_stamp_scenes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM heimdex_stamp(ARRAY(SELECT video_id FROM new_rows), 'scenes');
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM heimdex_stamp(ARRAY(SELECT video_id FROM old_rows), 'scenes');
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION heimdex_stamp_videos() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM heimdex_stamp(ARRAY(
        SELECT n.id FROM new_rows n JOIN old_rows o USING (id)
        WHERE (n.status, n.owner_id) IS DISTINCT FROM (o.status, o.owner_id)), 'videos');
    RETURN NULL;
END $$;

CREATE FUNCTION heimdex_stamp_owner_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM new_rows), TG_TABLE_NAME);
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM old_rows), TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;

-- A photo's content (what person_photo reads) and its status (what person_photo writes, and
-- person_query reads) are separate sources, so person_photo's own writes do not stamp its input.
-- Derived rows changed by anyone but the run that wrote the ledger (a manual delete, a cascade from
-- a deleted scene) are a change too; TG_ARGV[0] names the partition column. Pruning sets
-- heimdex.pruning: it removes generations that no freshness is measured against.
CREATE FUNCTION heimdex_stamp_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Pruning deletes only generations nobody serves or builds: no change to any partition's state.
    IF current_setting('heimdex.pruning', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_ARGV[0] = 'video_id' THEN
        PERFORM heimdex_stamp(ARRAY(SELECT video_id FROM old_rows), TG_TABLE_NAME);
    ELSE
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM old_rows), TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION heimdex_stamp_photos() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM new_rows), 'photo_content');
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM new_rows), 'photo_status');
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM old_rows), 'photo_content');
        PERFORM heimdex_stamp(ARRAY(SELECT owner_id FROM old_rows), 'photo_status');
    ELSE
        PERFORM heimdex_stamp(ARRAY(
            SELECT x.owner_id FROM new_rows n JOIN old_rows o USING (id),
                   LATERAL (VALUES (n.owner_id), (o.owner_id)) x(owner_id)
            WHERE (n.uri, n.sha256, n.person_id, n.owner_id) IS DISTINCT FROM (o.uri, o.sha256, o.person_id, o.owner_id)
        ), 'photo_content');
        PERFORM heimdex_stamp(ARRAY(
            SELECT x.owner_id FROM new_rows n JOIN old_rows o USING (id),
                   LATERAL (VALUES (n.owner_id), (o.owner_id)) x(owner_id)
            WHERE (n.status, n.person_id, n.owner_id) IS DISTINCT FROM (o.status, o.person_id, o.owner_id)
        ), 'photo_status');
    END IF;
    RETURN NULL;
END $$;
"""


def _stamp_triggers(table: str, function: str, events: tuple[str, ...], arg: str = "") -> str:
    out = []
    for event in events:
        refs = {
            "INSERT": "NEW TABLE AS new_rows",
            "DELETE": "OLD TABLE AS old_rows",
            "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        }[event]
        out.append(
            f"CREATE TRIGGER {table}_stamp_{event.lower()} AFTER {event} ON {table} "
            f"REFERENCING {refs} FOR EACH STATEMENT EXECUTE FUNCTION {function}({arg});"
        )
    return "\n".join(out)


ALL_EVENTS = ("INSERT", "UPDATE", "DELETE")


def _cols(alias: str, key: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in key.split(","))


UPGRADE = (
    STAMP_TRIGGERS
    + _stamp_triggers("scenes", "heimdex_stamp_scenes", ALL_EVENTS)
    + "\n"
    + _stamp_triggers("videos", "heimdex_stamp_videos", ("UPDATE",))
    + "\n"
    + _stamp_triggers("persons", "heimdex_stamp_owner_rows", ALL_EVENTS)
    + "\n"
    + _stamp_triggers("person_photo_vectors", "heimdex_stamp_owner_rows", ALL_EVENTS)
    + "\n"
    + _stamp_triggers("person_reference_photos", "heimdex_stamp_photos", ALL_EVENTS)
    + "\n"
    + "\n".join(
        _stamp_triggers(table, "heimdex_stamp_rows", ("UPDATE", "DELETE"), f"'{column}'")
        for table, column in (
            ("scene_text_vectors", "video_id"),
            ("scene_clip_vectors", "video_id"),
            ("scene_person_vectors", "video_id"),
            ("scene_person_scans", "video_id"),
            ("scene_search_documents", "video_id"),
            ("person_query_vectors", "owner_id"),
        )
    )
    + """

CREATE TABLE partition_ledger (
    step text NOT NULL,
    partition_id uuid NOT NULL,
    step_version text NOT NULL,
    model_id text NOT NULL,
    owner_id uuid NOT NULL,
    read_snapshot pg_snapshot NOT NULL,
    written_xid xid8 NOT NULL,
    items integer NOT NULL,
    failed integer NOT NULL,
    retry_at timestamptz,
    input_bytes bigint NOT NULL DEFAULT 0,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step, partition_id, step_version, model_id)
);
CREATE INDEX partition_ledger_owner ON partition_ledger (step, owner_id);

CREATE TABLE step_models (
    step text PRIMARY KEY,
    model_id text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by text NOT NULL
);

ALTER TABLE embedding_failures ADD COLUMN partition_id uuid;
UPDATE embedding_failures SET partition_id = coalesce(video_id, owner_id);
ALTER TABLE embedding_failures ALTER COLUMN partition_id SET NOT NULL;
ALTER TABLE embedding_failures ADD COLUMN retry_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE embedding_failures DROP CONSTRAINT embedding_failures_pkey;
ALTER TABLE embedding_failures ADD PRIMARY KEY (step, item_id, step_version, model_id);
CREATE INDEX embedding_failures_partition ON embedding_failures (step, partition_id);

ALTER TABLE scene_search_documents ADD COLUMN model_id text NOT NULL DEFAULT 'bm25';
ALTER TABLE scene_search_documents ALTER COLUMN model_id DROP DEFAULT;
"""
    + "\n".join(
        f"ALTER TABLE {t} DROP CONSTRAINT {t}_pkey; ALTER TABLE {t} ADD PRIMARY KEY ({key}, model_id);"
        for t, key in KEYED_TABLES
    )
)

DOWNGRADE = (
    """
DROP TABLE IF EXISTS partition_ledger, step_models, input_stamps;
DROP FUNCTION IF EXISTS heimdex_stamp_scenes, heimdex_stamp_videos, heimdex_stamp_owner_rows, heimdex_stamp_photos,
    heimdex_stamp_rows CASCADE;
DROP FUNCTION IF EXISTS heimdex_stamp(uuid[], text);
DROP INDEX IF EXISTS embedding_failures_partition;
ALTER TABLE embedding_failures DROP CONSTRAINT embedding_failures_pkey;
DELETE FROM embedding_failures a USING embedding_failures b
    WHERE (a.step, a.item_id, a.step_version) = (b.step, b.item_id, b.step_version) AND a.ctid < b.ctid;
ALTER TABLE embedding_failures ADD PRIMARY KEY (step, item_id, step_version);
ALTER TABLE embedding_failures DROP COLUMN partition_id, DROP COLUMN retry_at;
"""
    + "\n".join(
        f"DELETE FROM {t} a USING {t} b WHERE ({_cols('a', key)}) = ({_cols('b', key)}) "
        f"AND a.ctid < b.ctid; ALTER TABLE {t} DROP CONSTRAINT {t}_pkey; ALTER TABLE {t} ADD PRIMARY KEY ({key});"
        for t, key in KEYED_TABLES
    )
    + "\nALTER TABLE scene_search_documents DROP COLUMN model_id;"
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
