"""Keep ``scenes.updated_at`` true: any change of a scene's content stamps it.

The search index's freshness compares it with when a scene's document was indexed, so it must
not depend on every writer remembering to set it.

Revision ID: 0003_scene_updated_at
Revises: 0002_persons_and_search
Create Date: 2026-11-25
"""

from alembic import op

revision = "0003_scene_updated_at"
down_revision = "0002_persons_and_search"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION heimdex_touch_scene() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := greatest(now(), OLD.updated_at);
    RETURN NEW;
END $$;

CREATE TRIGGER scenes_touch BEFORE UPDATE ON scenes FOR EACH ROW
    WHEN ((OLD.scene_index, OLD.start_s, OLD.end_s, OLD.transcript, OLD.visual_description, OLD.tags,
           OLD.summary, OLD.thumbnail_uri, OLD.thumbnail_sha256)
          IS DISTINCT FROM
          (NEW.scene_index, NEW.start_s, NEW.end_s, NEW.transcript, NEW.visual_description, NEW.tags,
           NEW.summary, NEW.thumbnail_uri, NEW.thumbnail_sha256))
    EXECUTE FUNCTION heimdex_touch_scene();
"""

DOWNGRADE = """
DROP TRIGGER IF EXISTS scenes_touch ON scenes;
DROP FUNCTION IF EXISTS heimdex_touch_scene();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
