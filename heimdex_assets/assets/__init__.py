"""Software-defined assets: one module per asset family, named after what it produces."""

from heimdex_assets.assets.person_photo import person_photo_embeddings
from heimdex_assets.assets.person_query import person_query_embeddings
from heimdex_assets.assets.scene_clip import scene_clip_embeddings
from heimdex_assets.assets.scene_person import scene_person_embeddings
from heimdex_assets.assets.scene_search import scene_search_index
from heimdex_assets.assets.scene_text import scene_text_embeddings
from heimdex_assets.assets.sources import SOURCE_ASSETS

VIDEO_ASSETS = [scene_text_embeddings, scene_clip_embeddings, scene_person_embeddings, scene_search_index]
OWNER_ASSETS = [person_photo_embeddings, person_query_embeddings]
DERIVED_ASSETS = [*VIDEO_ASSETS, *OWNER_ASSETS]

__all__ = [
    "DERIVED_ASSETS",
    "OWNER_ASSETS",
    "SOURCE_ASSETS",
    "VIDEO_ASSETS",
    "person_photo_embeddings",
    "person_query_embeddings",
    "scene_clip_embeddings",
    "scene_person_embeddings",
    "scene_search_index",
    "scene_text_embeddings",
]
