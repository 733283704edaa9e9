"""``scene_clip``: one item per scene with a thumbnail; its identity is the declared sha256 of the
image bytes, or (undeclared) the sha256 of its URI. A scene without a thumbnail has no item."""

from heimdex_assets.db.tables import scene_clip_vectors
from heimdex_assets.spec import SPEC
from heimdex_assets.steps.base import Step, declared_or_uri_sha256, trim_sql

# Shared with scene_person, which reads the same thumbnails.
THUMBNAIL_ITEMS_SQL = f"""
    SELECT s.video_id AS partition_id, s.owner_id, s.id::text AS item_id,
           {declared_or_uri_sha256("s.thumbnail_sha256", "s.thumbnail_uri")} AS input_sha256,
           s.id AS scene_id, s.thumbnail_uri AS uri, s.thumbnail_sha256 AS declared_sha256
    FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY'
    WHERE {trim_sql("s.thumbnail_uri")} IS NOT NULL {{scope}}"""

STEP = Step(
    spec=SPEC.step("scene_clip"),
    partitioning="video",
    items_sql=THUMBNAIL_ITEMS_SQL,
    partition_column="s.video_id",
    owner_column="s.owner_id",
    table=scene_clip_vectors,
    item_key="r.scene_id::text",
    sources=("scenes", "videos"),
)
