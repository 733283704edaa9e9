"""The search read path: lexical (BM25), semantic (pgvector), hybrid (RRF) and person ranking.

Every query is filtered by owner at every stage, and results are hydrated from ``scenes`` with
the owner filter again: a scene of another owner can never come back, whatever an index holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from sqlalchemy import Connection, Table, bindparam, select, text

from heimdex_assets.db.tables import (
    person_query_vectors,
    persons,
    scene_clip_vectors,
    scene_person_vectors,
    scene_text_vectors,
    scenes,
)
from heimdex_assets.generations import serving_generations
from heimdex_assets.spec import SPEC

Mode = Literal["lexical", "semantic", "hybrid"]
RRF_K = 60  # reciprocal_rank_fusion's default, the constant of Cormack et al. (2009)
# What search_scenes fuses with, chosen by bench/fusion.py (known-item queries; figures in bench/README.md).
# With k=60 over 30-deep lists, being in both lists beat being first in one: scenes a lexical list held for
# "the" alone outranked the semantic first. Without smoothing and with a lexical rank worth a sixth of a
# semantic one (a lexical first weighs as a semantic sixth), lexical matches break near-ties of the semantic
# order. Lists not named here ("clip", "person") weigh 1.
HYBRID_RRF_K = 0
HYBRID_WEIGHTS = {"bm25": 1 / 6}
SEMANTIC_CHANNELS = ("transcript", "visual")


class SearchError(ValueError):
    """A query that cannot be answered (unknown person, person of another owner, empty query)."""


@dataclass
class SearchResult:
    """One scene found, with the ranks it had in each list that was fused."""

    scene_id: uuid.UUID
    video_id: uuid.UUID
    scene_index: int
    start_s: float
    end_s: float
    score: float
    snippet: str
    ranks: dict[str, int] = field(default_factory=dict)


def reciprocal_rank_fusion(
    rankings: dict[str, Sequence[uuid.UUID]], k: float = RRF_K, weights: Mapping[str, float] | None = None
) -> list[tuple[uuid.UUID, float]]:
    """Scenes ordered by the sum of weight/(k + rank) over the lists they appear in; a list's weight is
    ``weights[name]``, 1 when not named (ties: first seen)."""
    scores: dict[uuid.UUID, float] = {}
    for name, ranked in rankings.items():
        weight = weights.get(name, 1.0) if weights else 1.0
        for rank, scene_id in enumerate(ranked, start=1):
            scores[scene_id] = scores.get(scene_id, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def nearest_scenes(
    conn: Connection,
    table: Table,
    owner_id: uuid.UUID,
    query: np.ndarray,
    *,
    version: str,
    model_id: str,
    limit: int,
    channels: Sequence[str] | None = None,
) -> list[uuid.UUID]:
    """Scenes of ``owner_id`` nearest to ``query`` by cosine distance (best row per scene).

    The vector is cast to its fixed dimension so the partial HNSW index of that dimension can
    serve the query; iterative scans keep the owner filter from starving the result.
    """
    dim = int(query.shape[0])
    conn.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    channel_filter = "AND channel = ANY(:channels)" if channels else ""
    stmt = text(
        f"""
        SELECT scene_id, min(distance) AS distance FROM (
            SELECT scene_id, (embedding::vector({dim})) <=> CAST(:q AS vector({dim})) AS distance
            FROM {table.name}
            WHERE owner_id = :owner AND step_version = :version AND model_id = :model AND dimension = {dim}
            {channel_filter}
            ORDER BY distance
            LIMIT :fetch
        ) nearest GROUP BY scene_id ORDER BY distance, scene_id LIMIT :limit
        """
    )
    params = {
        "q": "[" + ",".join(f"{x:.7g}" for x in query.tolist()) + "]",
        "owner": owner_id,
        "version": version,
        "model": model_id,
        "fetch": limit * 8,
        "limit": limit,
    }
    if channels:
        params["channels"] = list(channels)
    return [row.scene_id for row in conn.execute(stmt, params)]


def person_query_vector(
    conn: Connection, owner_id: uuid.UUID, person_id: uuid.UUID, model_id: str | None = None
) -> tuple[np.ndarray, str]:
    """The person's query vector (of ``model_id`` when given: the scene person vectors' model, which
    it must share) and its model; SearchError if the person is not the owner's."""
    owner = conn.execute(select(persons.c.owner_id).where(persons.c.id == person_id)).scalar()
    if owner is None or owner != owner_id:
        # Same message for "absent" and "another owner's": existence is not leaked across tenants.
        raise SearchError(f"person {person_id} not found for owner {owner_id}")
    q = person_query_vectors
    row = conn.execute(
        select(q.c.embedding, q.c.model_id)
        .where(
            q.c.person_id == person_id,
            q.c.owner_id == owner_id,
            *([q.c.model_id == model_id] if model_id is not None else []),
        )
        # The spec's current version first, else the newest one of that model.
        .order_by((q.c.step_version == SPEC.step("person_query").version).desc(), q.c.step_version.desc())
        .limit(1)
    ).first()
    if row is None:
        raise SearchError(f"person {person_id} has no query vector yet (no READY reference photo?)")
    return np.asarray(row.embedding, dtype=np.float32), row.model_id


def query_embedder(text_embedder: object, model_id: str) -> object:
    """An embedder of ``model_id`` for queries: this process's own, or the local model when that is the
    one the active vectors were made by; SearchError when this process cannot make such vectors."""
    from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID, TextEmbedder

    if text_embedder.model_id == model_id:
        return text_embedder
    if model_id == LOCAL_MODEL_ID:
        return TextEmbedder(provider="local")
    raise SearchError(
        f"the active text vectors are {model_id}, but this process is configured for {text_embedder.model_id}"
    )


def _snippet(transcript: str | None, query: str, width: int = 160) -> str:
    """A window of the transcript around the longest query word it contains (rarer words are longer)."""
    body = " ".join((transcript or "").split())
    lowered = body.lower()
    positions = [lowered.find(w) for w in sorted({w.lower() for w in query.split()}, key=len, reverse=True)]
    hit = next((p for p in positions if p >= 0), -1)
    start = max(0, hit - width // 3) if hit >= 0 else 0
    piece = body[start : start + width]
    return ("…" if start else "") + piece + ("…" if start + width < len(body) else "")


def hydrate(
    conn: Connection, owner_id: uuid.UUID, fused: list[tuple[uuid.UUID, float]], rankings: dict, query: str
) -> list[SearchResult]:
    """Scene rows for the fused ids, owner-filtered again, in fused order."""
    if not fused:
        return []
    ids = [scene_id for scene_id, _ in fused]
    rows = {
        r.id: r
        for r in conn.execute(
            select(scenes).where(scenes.c.id.in_(bindparam("ids", expanding=True)), scenes.c.owner_id == owner_id),
            {"ids": ids},
        )
    }
    results = []
    for scene_id, score in fused:
        r = rows.get(scene_id)
        if r is None:  # deleted since indexing, or (never) another owner's
            continue
        ranks = {name: ranked.index(scene_id) + 1 for name, ranked in rankings.items() if scene_id in ranked}
        results.append(
            SearchResult(
                scene_id,
                r.video_id,
                r.scene_index,
                r.start_s,
                r.end_s,
                round(score, 6),
                _snippet(r.transcript, query),
                ranks,
            )
        )
    return results


def search_scenes(
    db: object,
    owner_id: uuid.UUID,
    query: str,
    *,
    mode: Mode = "hybrid",
    person_id: uuid.UUID | None = None,
    limit: int = 10,
    text_embedder: object | None = None,
    clip: object | None = None,
    search_index: object | None = None,
) -> list[SearchResult]:
    """The owner's scenes that best match ``query`` (and/or show ``person_id``), best first."""
    query = (query or "").strip()
    if not query and person_id is None:
        raise SearchError("empty query: give words to search for, or --person-id")
    rankings: dict[str, list[uuid.UUID]] = {}
    depth = max(limit * 3, 30)
    if query and mode in ("lexical", "hybrid"):
        # The alias follows the active search generation (heimdex_assets.generations).
        rankings["bm25"] = [uuid.UUID(str(h.scene_id)) for h in search_index.search(owner_id, query, depth)]
    # One snapshot for the whole query: a flip commits before or after it, never in the middle.
    reader = db.engine.connect().execution_options(isolation_level="REPEATABLE READ")
    with reader as conn, conn.begin():
        active = serving_generations(
            conn,
            {
                "scene_text": text_embedder.model_id if text_embedder is not None else "",
                "scene_clip": clip.model_id if clip is not None else "",
            },
        )
        text_gen, clip_gen = active.get("scene_text"), active.get("scene_clip")
        if query and mode in ("semantic", "hybrid") and text_gen is not None:
            rankings["text"] = nearest_scenes(
                conn,
                scene_text_vectors,
                owner_id,
                query_embedder(text_embedder, text_gen.model_id).embed_query(query),
                version=text_gen.version,
                model_id=text_gen.model_id,
                limit=depth,
                channels=SEMANTIC_CHANNELS,
            )
            # Random CLIP weights cannot rank text against images; nor can a CLIP other than the vectors'.
            if clip_gen is not None and not clip.is_placeholder and clip_gen.model_id == clip.model_id:
                rankings["clip"] = nearest_scenes(
                    conn,
                    scene_clip_vectors,
                    owner_id,
                    clip.embed_texts([query])[0],
                    version=clip_gen.version,
                    model_id=clip_gen.model_id,
                    limit=depth,
                )
        if person_id is not None:
            person_gen = active.get("scene_person")
            if person_gen is None:
                raise SearchError("person search has no complete generation of scene person vectors yet")
            vector, _ = person_query_vector(conn, owner_id, person_id, person_gen.model_id)
            rankings["person"] = nearest_scenes(
                conn,
                scene_person_vectors,
                owner_id,
                vector,
                version=person_gen.version,
                model_id=person_gen.model_id,
                limit=depth,
            )
        fused = reciprocal_rank_fusion(rankings, k=HYBRID_RRF_K, weights=HYBRID_WEIGHTS)[:limit]
        return hydrate(conn, owner_id, fused, rankings, query)
