"""The application's own tables, shown in the asset graph for lineage (written by the product)."""

import dagster as dg

_SOURCE = {"group_name": "sources", "kinds": {"postgres"}}

videos = dg.AssetSpec("videos", description="Videos of each owner, with their processing status.", **_SOURCE)
scenes = dg.AssetSpec(
    "scenes",
    deps=[videos],
    description="Scenes: transcript, visual description, tags, summary, thumbnail.",
    **_SOURCE,
)
persons = dg.AssetSpec("persons", description="People an owner searches for.", **_SOURCE)
person_reference_photos = dg.AssetSpec(
    "person_reference_photos", deps=[persons], description="Reference photos of each person.", **_SOURCE
)

SOURCE_ASSETS = [videos, scenes, persons, person_reference_photos]
