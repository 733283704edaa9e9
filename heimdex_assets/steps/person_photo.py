"""``person_photo``: one item per reference photo; its identity is the declared sha256 of the
image, or (undeclared) the sha256 of its URI. The photo's status is this step's output."""

from heimdex_assets.db.tables import person_photo_vectors
from heimdex_assets.spec import SPEC
from heimdex_assets.steps.base import Step, declared_or_uri_sha256

STEP = Step(
    spec=SPEC.step("person_photo"),
    partitioning="owner",
    items_sql=f"""
        SELECT p.owner_id AS partition_id, p.owner_id, p.id::text AS item_id,
               {declared_or_uri_sha256("p.sha256", "p.uri")} AS input_sha256,
               p.id AS photo_id, p.person_id, p.uri, p.sha256 AS declared_sha256
        FROM person_reference_photos p WHERE TRUE {{scope}}""",
    partition_column="p.owner_id",
    owner_column="p.owner_id",
    table=person_photo_vectors,
    item_key="r.photo_id::text",
    sources=("photo_content",),
)
