"""Heimdex Assets: embeddings and search indexes kept in step with the embedding spec."""

from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION, SPEC, EmbeddingSpec, EmbeddingStep

__all__ = ["LATEST_EMBEDDING_SPEC_VERSION", "SPEC", "EmbeddingSpec", "EmbeddingStep"]
