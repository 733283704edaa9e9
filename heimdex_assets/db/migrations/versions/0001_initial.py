"""Initial schema: source tables, versioned vector tables, text cache and failures.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-25
"""

from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

# Input hashes of text channels are generated columns, so an edited transcript changes its hash
# in the same statement that edits it; staleness SQL compares them with the hash on vector rows.
UPGRADE = r"""
CREATE EXTENSION IF NOT EXISTS vector;

CREATE FUNCTION heimdex_sha256_hex(input text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN encode(sha256(convert_to(input, 'UTF8')), 'hex');

-- The visual channel's source: description and tags, joined with a separator no text contains.
CREATE FUNCTION heimdex_visual_source(description text, tags text[]) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(description, '') || chr(31) || array_to_string(coalesce(tags, '{}'::text[]), chr(31));

CREATE TABLE owners (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE videos (
    id uuid PRIMARY KEY,
    owner_id uuid NOT NULL REFERENCES owners(id) ON DELETE CASCADE,
    title text NOT NULL DEFAULT '',
    status text NOT NULL CHECK (status IN ('UPLOADING', 'PROCESSING', 'READY', 'FAILED')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX videos_owner_created ON videos (owner_id, created_at, id);
CREATE INDEX videos_status ON videos (status);

CREATE TABLE scenes (
    id uuid PRIMARY KEY,
    video_id uuid NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    owner_id uuid NOT NULL REFERENCES owners(id) ON DELETE CASCADE,
    scene_index integer NOT NULL CHECK (scene_index >= 0),
    start_s double precision NOT NULL,
    end_s double precision NOT NULL,
    transcript text,
    visual_description text,
    tags text[] NOT NULL DEFAULT '{}',
    summary text,
    thumbnail_uri text,
    thumbnail_sha256 text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    transcript_sha256 text GENERATED ALWAYS AS (heimdex_sha256_hex(transcript)) STORED,
    visual_sha256 text GENERATED ALWAYS AS (
        heimdex_sha256_hex(heimdex_visual_source(visual_description, tags))) STORED,
    summary_sha256 text GENERATED ALWAYS AS (heimdex_sha256_hex(summary)) STORED,
    UNIQUE (video_id, scene_index),
    CHECK (end_s >= start_s)
);
CREATE INDEX scenes_owner ON scenes (owner_id);

CREATE TABLE persons (
    id uuid PRIMARY KEY,
    owner_id uuid NOT NULL REFERENCES owners(id) ON DELETE CASCADE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX persons_owner ON persons (owner_id);

CREATE TABLE person_reference_photos (
    id uuid PRIMARY KEY,
    person_id uuid NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
    owner_id uuid NOT NULL REFERENCES owners(id) ON DELETE CASCADE,
    uri text NOT NULL,
    sha256 text,
    status text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'READY', 'FAILED')),
    failure_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX person_reference_photos_owner ON person_reference_photos (owner_id, person_id);

-- Vector rows: keyed by item and step version, so two versions live side by side.
CREATE TABLE scene_text_vectors (
    scene_id uuid NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    channel text NOT NULL,
    step_version text NOT NULL,
    video_id uuid NOT NULL,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    dimension integer NOT NULL,
    embedding vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scene_id, channel, step_version)
);
CREATE INDEX scene_text_vectors_video ON scene_text_vectors (video_id, step_version);
CREATE INDEX scene_text_vectors_owner ON scene_text_vectors (owner_id, step_version);
CREATE INDEX scene_text_vectors_hnsw_384 ON scene_text_vectors
    USING hnsw ((embedding::vector(384)) vector_cosine_ops) WHERE dimension = 384;
CREATE INDEX scene_text_vectors_hnsw_1536 ON scene_text_vectors
    USING hnsw ((embedding::vector(1536)) vector_cosine_ops) WHERE dimension = 1536;

CREATE TABLE scene_clip_vectors (
    scene_id uuid NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    step_version text NOT NULL,
    video_id uuid NOT NULL,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    dimension integer NOT NULL,
    embedding vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scene_id, step_version)
);
CREATE INDEX scene_clip_vectors_video ON scene_clip_vectors (video_id, step_version);
CREATE INDEX scene_clip_vectors_owner ON scene_clip_vectors (owner_id, step_version);
CREATE INDEX scene_clip_vectors_hnsw_512 ON scene_clip_vectors
    USING hnsw ((embedding::vector(512)) vector_cosine_ops) WHERE dimension = 512;

-- Text vectors by (model, sha256 of the exact text sent): the same text is never paid for twice.
CREATE TABLE text_embedding_cache (
    model_id text NOT NULL,
    text_sha256 text NOT NULL,
    embedding vector NOT NULL,
    truncated boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, text_sha256)
);

-- Items that could not be embedded: failed, not stale, until retried, their input changes,
-- or the backoff passes.
CREATE TABLE embedding_failures (
    step text NOT NULL,
    item_id text NOT NULL,
    step_version text NOT NULL,
    video_id uuid,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    reason text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    failed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step, item_id, step_version)
);
CREATE INDEX embedding_failures_video ON embedding_failures (step, video_id);
CREATE INDEX embedding_failures_owner ON embedding_failures (step, owner_id);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS embedding_failures, text_embedding_cache, scene_clip_vectors, scene_text_vectors,
    person_reference_photos, persons, scenes, videos, owners;
DROP FUNCTION IF EXISTS heimdex_visual_source(text, text[]);
DROP FUNCTION IF EXISTS heimdex_sha256_hex(text);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
