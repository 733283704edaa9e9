"""``scene_search``: one item per scene of a READY video, its search document built here.

The document's identity is the sha256 of its canonical JSON (PostgreSQL's ``jsonb`` text), and
the model identity is the index's own (``SearchIndex.index_identity``): documents recorded in an
index that has since been wiped or recreated are not done.
"""

from heimdex_assets.db.tables import scene_search_documents
from heimdex_assets.spec import SPEC
from heimdex_assets.steps.base import Step, sha256_sql

_DOCUMENT = """jsonb_build_object(
    'owner_id', s.owner_id::text, 'video_id', s.video_id::text, 'scene_id', s.id::text,
    'scene_index', s.scene_index, 'start_s', s.start_s, 'end_s', s.end_s,
    'transcript', s.transcript, 'visual_description', s.visual_description,
    'tags', to_jsonb(s.tags), 'summary', s.summary)"""

STEP = Step(
    spec=SPEC.step("scene_search"),
    partitioning="video",
    items_sql=f"""
        SELECT s.video_id AS partition_id, s.owner_id, s.id::text AS item_id,
               {sha256_sql("d.document::text")} AS input_sha256, s.id AS scene_id, d.document
        FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY'
        CROSS JOIN LATERAL (SELECT {_DOCUMENT} AS document) d
        WHERE TRUE {{scope}}""",
    partition_column="s.video_id",
    owner_column="s.owner_id",
    table=scene_search_documents,
    item_key="r.scene_id::text",
    sources=("scenes", "videos"),
    missing_per_model=True,
)
