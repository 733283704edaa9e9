"""``person_query``: one item per person with at least one READY photo vector of the photo step's
current generation; its identity is the sha256 of the sorted ``photo_id:input_sha256`` lines of
those vectors. A person without one has no item, so its old query vector is stray and removed."""

from heimdex_assets.db.tables import person_query_vectors
from heimdex_assets.spec import SPEC
from heimdex_assets.steps.base import Step, sha256_sql

STEP = Step(
    spec=SPEC.step("person_query"),
    partitioning="owner",
    items_sql=f"""
        SELECT pr.owner_id AS partition_id, pr.owner_id, pr.id::text AS item_id,
               {sha256_sql("ps.lines")} AS input_sha256, pr.id AS person_id, pr.name, ps.photo_ids
        FROM persons pr CROSS JOIN LATERAL (
            SELECT string_agg(v.photo_id::text || ':' || v.input_sha256, E'\\n' ORDER BY v.photo_id) AS lines,
                   array_agg(v.photo_id ORDER BY v.photo_id) AS photo_ids
            FROM person_photo_vectors v
            JOIN person_reference_photos p ON p.id = v.photo_id AND p.status = 'READY' AND p.person_id = pr.id
            WHERE v.owner_id = pr.owner_id AND v.step_version = :photo_version AND v.model_id = :photo_model
        ) ps
        WHERE ps.lines IS NOT NULL {{scope}}""",
    partition_column="pr.owner_id",
    owner_column="pr.owner_id",
    table=person_query_vectors,
    item_key="r.person_id::text",
    sources=("persons", "photo_status", "person_photo_vectors"),
    upstream=("person_photo",),
    params={
        "photo_version": SPEC.step("person_photo").version,
        # The vectors averaged are the photo step's, under the model the deployment expects of it.
        "photo_model": lambda models: models["person_photo"],
    },
)
