"""Text vectors cached by (model, sha256 of the exact text sent): nothing is paid for twice."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert

from heimdex_assets.db.tables import text_embedding_cache
from heimdex_assets.resources.text_embedder import TextEmbedder


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CachedEmbeddings:
    """One vector per requested text (a zero row for a failed one); how many came from the cache, how many
    were embedded, and why each text in ``failed`` (by index in the request) has no vector."""

    vectors: np.ndarray
    truncated: list[bool]
    reused: int
    embedded: int
    requests: int
    retries: int
    failed: dict[int, str] = field(default_factory=dict)


def embed_texts_cached(engine: Engine, embedder: TextEmbedder, texts: list[str]) -> CachedEmbeddings:
    """Vectors for ``texts``: cached ones read back, the rest embedded once each and cached request by request.
    A request that fails for good fails only its texts; what was paid for before or after it stays cached."""
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

    def cache(rows: list[int], vectors: np.ndarray, truncated: list[bool]) -> None:
        # Content-addressed and write-once, so each request's vectors commit on their own as they arrive: a
        # later failure (another request, a partition write, the process) keeps what was paid for.
        with engine.begin() as conn:
            conn.execute(
                insert(text_embedding_cache).on_conflict_do_nothing(),
                [
                    {"model_id": model_id, "text_sha256": missing[r], "embedding": v, "truncated": t}
                    for r, v, t in zip(rows, vectors, truncated, strict=True)
                ],
            )
        for r, v, t in zip(rows, vectors, truncated, strict=True):
            cached[missing[r]] = (v, t)

    batch = embedder.embed_texts([unique[sha] for sha in missing], on_embedded=cache, isolate_failures=True)
    failed_shas = {missing[r]: why for r, why in batch.failed.items()}
    dim = embedder.dimension
    found = [cached.get(k, (np.zeros(dim, dtype=np.float32), False)) for k in keys]  # a zero row if failed
    return CachedEmbeddings(
        vectors=np.stack([v for v, _ in found]) if found else np.zeros((0, dim), dtype=np.float32),
        truncated=[t for _, t in found],
        reused=len(unique) - len(missing),
        embedded=len(missing) - len(failed_shas),
        requests=batch.requests,
        retries=batch.retries,
        failed={n: failed_shas[k] for n, k in enumerate(keys) if k in failed_shas},
    )
