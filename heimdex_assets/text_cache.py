"""Text vectors cached by (model, sha256 of the exact text sent): nothing is paid for twice."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert

from heimdex_assets.db.tables import text_embedding_cache
from heimdex_assets.resources.text_embedder import TextEmbedder


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CachedEmbeddings:
    """One vector per requested text; how many came from the cache and how many were embedded."""

    vectors: np.ndarray
    truncated: list[bool]
    reused: int
    embedded: int
    requests: int
    retries: int


def embed_texts_cached(engine: Engine, embedder: TextEmbedder, texts: list[str]) -> CachedEmbeddings:
    """Vectors for ``texts``: cached ones read back, the rest embedded once each and cached."""
    model_id = embedder.model_id
    keys = [text_sha256(t) for t in texts]
    unique = dict(zip(keys, texts, strict=True))
    cached: dict[str, tuple[np.ndarray, bool]] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                text_embedding_cache.c.text_sha256,
                text_embedding_cache.c.embedding,
                text_embedding_cache.c.truncated,
            )
            .where(text_embedding_cache.c.model_id == model_id)
            .where(text_embedding_cache.c.text_sha256.in_(list(unique)))
        )
        for sha, vector, truncated in rows:
            cached[sha] = (np.asarray(vector, dtype=np.float32), truncated)
    missing = [sha for sha in unique if sha not in cached]
    batch = embedder.embed_texts([unique[sha] for sha in missing])
    if missing:
        # Content-addressed and write-once, so the cache commits on its own: a failed partition
        # write later keeps what was paid for.
        with engine.begin() as conn:
            conn.execute(
                insert(text_embedding_cache).on_conflict_do_nothing(),
                [
                    {"model_id": model_id, "text_sha256": sha, "embedding": batch.vectors[i], "truncated": t}
                    for i, (sha, t) in enumerate(zip(missing, batch.truncated, strict=True))
                ],
            )
        for i, sha in enumerate(missing):
            cached[sha] = (batch.vectors[i], batch.truncated[i])
    dim = embedder.dimension
    vectors = np.stack([cached[k][0] for k in keys]) if keys else np.zeros((0, dim), dtype=np.float32)
    return CachedEmbeddings(
        vectors=vectors,
        truncated=[cached[k][1] for k in keys],
        reused=len(unique) - len(missing),
        embedded=len(missing),
        requests=batch.requests,
        retries=batch.retries,
    )
