"""Person detections, person photo and query vectors, and the search-document ledger.

Revision ID: 0002_persons_and_search
Revises: 0001_initial
Create Date: 2026-11-25
"""

from alembic import op

revision = "0002_persons_and_search"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- One row per person detected in a scene thumbnail: box in thumbnail pixels, detector score.
CREATE TABLE scene_person_vectors (
    scene_id uuid NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    step_version text NOT NULL,
    detection_index integer NOT NULL,
    video_id uuid NOT NULL,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    detector text NOT NULL,
    box_x integer NOT NULL,
    box_y integer NOT NULL,
    box_w integer NOT NULL,
    box_h integer NOT NULL,
    score double precision NOT NULL,
    dimension integer NOT NULL,
    embedding vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scene_id, step_version, detection_index)
);
CREATE INDEX scene_person_vectors_video ON scene_person_vectors (video_id, step_version);
CREATE INDEX scene_person_vectors_owner ON scene_person_vectors (owner_id, step_version);
CREATE INDEX scene_person_vectors_hnsw_512 ON scene_person_vectors
    USING hnsw ((embedding::vector(512)) vector_cosine_ops) WHERE dimension = 512;

-- Scenes whose thumbnail was searched for people under a version, even when none was found
-- (a scene with no detection has no vector rows and is still fresh).
CREATE TABLE scene_person_scans (
    scene_id uuid NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    step_version text NOT NULL,
    video_id uuid NOT NULL,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    detections integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scene_id, step_version)
);
CREATE INDEX scene_person_scans_video ON scene_person_scans (video_id, step_version);

CREATE TABLE person_photo_vectors (
    photo_id uuid NOT NULL REFERENCES person_reference_photos(id) ON DELETE CASCADE,
    step_version text NOT NULL,
    person_id uuid NOT NULL,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    dimension integer NOT NULL,
    embedding vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (photo_id, step_version)
);
CREATE INDEX person_photo_vectors_owner ON person_photo_vectors (owner_id, step_version);

CREATE TABLE person_query_vectors (
    person_id uuid NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
    step_version text NOT NULL,
    owner_id uuid NOT NULL,
    model_id text NOT NULL,
    input_sha256 text NOT NULL,
    photo_count integer NOT NULL,
    dimension integer NOT NULL,
    embedding vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (person_id, step_version)
);
CREATE INDEX person_query_vectors_owner ON person_query_vectors (owner_id, step_version);

-- What the search index holds: one row per scene document per search-step version.
CREATE TABLE scene_search_documents (
    scene_id uuid NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
    step_version text NOT NULL,
    video_id uuid NOT NULL,
    owner_id uuid NOT NULL,
    index_name text NOT NULL,
    input_sha256 text NOT NULL,
    indexed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scene_id, step_version)
);
CREATE INDEX scene_search_documents_video ON scene_search_documents (video_id, step_version);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS scene_search_documents, person_query_vectors, person_photo_vectors, scene_person_scans,
    scene_person_vectors;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
