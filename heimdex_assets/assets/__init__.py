"""Software-defined assets: one module per asset family, named after what it produces."""

from heimdex_assets.assets.scene_clip import scene_clip_embeddings
from heimdex_assets.assets.scene_text import scene_text_embeddings
from heimdex_assets.assets.sources import SOURCE_ASSETS

EMBEDDING_ASSETS = [scene_text_embeddings, scene_clip_embeddings]

__all__ = ["EMBEDDING_ASSETS", "SOURCE_ASSETS", "scene_clip_embeddings", "scene_text_embeddings"]
