"""``scene_person``: the same items as ``scene_clip`` (scenes with a thumbnail). One scan row per
searched thumbnail says it was done (with how many people); one vector row per person found."""

from heimdex_assets.db.tables import scene_person_scans, scene_person_vectors
from heimdex_assets.spec import SPEC
from heimdex_assets.steps.base import Step
from heimdex_assets.steps.scene_clip import THUMBNAIL_ITEMS_SQL

STEP = Step(
    spec=SPEC.step("scene_person"),
    partitioning="video",
    items_sql=THUMBNAIL_ITEMS_SQL,
    partition_column="s.video_id",
    owner_column="s.owner_id",
    table=scene_person_scans,
    item_key="r.scene_id::text",
    extra_tables=(scene_person_vectors,),
    sources=("scenes", "videos"),
)
