"""Heimdex Assets: embeddings and search indexes kept in step with the embedding spec."""

import warnings

import dagster as dg

from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION, SPEC, EmbeddingSpec, EmbeddingStep

__all__ = ["LATEST_EMBEDDING_SPEC_VERSION", "SPEC", "EmbeddingSpec", "EmbeddingStep"]

# BackfillPolicy is beta in Dagster 1.13 and says so at every asset definition; we rely on it knowingly.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")
