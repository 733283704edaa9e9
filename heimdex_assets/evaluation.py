"""The evaluation gate: a candidate generation serves search only if it retrieves as well as the active one.

Known-item retrieval drawn from the corpus itself, deterministically (the same corpus gives the same
set), per owner, and ranked within that owner's scenes only:

- ``scene_text``: a query of 3 to 6 content words drawn from a scene's transcript (else its visual
  description), shuffled: never the literal text. The target is that scene.
- ``scene_clip``: image to image: the scene's thumbnail, mirrored and cropped, against the owner's
  thumbnail vectors.
- ``scene_person``: person to scene: a detected person's crop, mirrored, against the owner's scene
  person vectors (best detection per scene).
- ``person_photo``: photo to person, leave one out: each reference photo's vector against the other
  photos of the owner's persons (persons with two photos or more). Needs no model: it reads vectors.

``person_query`` (the mean of the photo vectors) and ``scene_search`` (documents, no model) have no
gate of their own: the first is gated through ``person_photo``, the second is the scene text itself.

The figure is MRR@10 of the candidate against the active generation on the same queries; the gate
refuses a candidate worse by more than ``HEIMDEX_GATE_MARGIN`` (default 0.05) *and* by more than two
standard errors of the paired per-query difference: on a small corpus one unlucky query is not a
regression, on any corpus a model that ranks nothing is. When this process cannot embed queries for
the active generation (another model), the figure stored at its activation is the baseline (the
standard error is then the candidate's own), and the result says so.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from sqlalchemy import Connection, text

from heimdex_assets.db.tables import scene_clip_vectors, scene_person_vectors, scene_text_vectors
from heimdex_assets.models import person_identity
from heimdex_assets.steps import Step

GATED_STEPS = ("scene_text", "scene_clip", "scene_person", "person_photo")
DEFAULT_MARGIN = 0.05
QUERIES_PER_OWNER = 20
MAX_QUERIES = 200
TOP_K = 10
SEED = "heimdex-gate-1"
# Words too common to point at one scene (short words are dropped anyway).
STOPWORDS = frozenset(
    """about above after again against also because been before being below between both could does doing down
    during each from further have having here into itself just more most other over same should some such than
    that their theirs them then there these they this those through under until very what when where which while
    with would your yours shall will were wasn""".split()  # noqa: SIM905
)


def gate_margin() -> float:
    """``HEIMDEX_GATE_MARGIN``: how much lower (absolute MRR@10) a candidate may score than the active one."""
    raw = os.environ.get("HEIMDEX_GATE_MARGIN", "").strip()
    try:
        return float(raw) if raw else DEFAULT_MARGIN
    except ValueError:
        raise ValueError(f"HEIMDEX_GATE_MARGIN must be a number, not {raw!r}") from None


@dataclass(frozen=True)
class Evaluation:
    """What the gate measured: MRR@10 of the candidate and of the active generation on ``queries``."""

    step: str
    queries: int
    candidate_mrr: float | None
    active_mrr: float | None
    margin: float
    baseline: str  # "measured", "stored at activation", "none" (first generation or nothing to compare)
    stderr: float = 0.0  # of the candidate's drop below the active figure
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.candidate_mrr is None or self.active_mrr is None:
            return True  # nothing to compare against (first generation, or no query could be drawn)
        drop = self.active_mrr - self.candidate_mrr
        return drop <= self.margin or drop <= 2 * self.stderr

    def summary(self) -> str:
        fig = "n/a" if self.candidate_mrr is None else f"{self.candidate_mrr:.3f}"
        act = "n/a" if self.active_mrr is None else f"{self.active_mrr:.3f}"
        verdict = "passed" if self.passed else "refused"
        text_ = (
            f"gate {verdict}: MRR@10 candidate {fig} vs active {act} ({self.baseline}), margin {self.margin}, "
            f"2 stderr {2 * self.stderr:.3f}"
        )
        return text_ + f", {self.queries} queries" + (f"; {self.note}" if self.note else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": f"mrr@{TOP_K}",
            "queries": self.queries,
            "candidate_mrr": self.candidate_mrr,
            "active_mrr": self.active_mrr,
            "margin": self.margin,
            "stderr": self.stderr,
            "baseline": self.baseline,
            "passed": self.passed,
            "note": self.note,
        }


@dataclass(frozen=True)
class KnownItem:
    owner_id: Any
    target: Any  # the scene (or person) the query was drawn from
    query: Any  # words, an image, or a stored vector's key


def _rng(key: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{SEED}:{key}".encode()).digest()[:8], "little"))


def query_words(key: Any, body: str | None) -> str | None:
    """3 to 6 distinct content words of ``body``, drawn and shuffled by ``key``; None below 3."""
    words = list(dict.fromkeys(w for w in re.findall(r"[^\W\d_]{4,}", (body or "").lower()) if w not in STOPWORDS))
    if len(words) < 3:
        return None
    rng = _rng(key)
    return " ".join(rng.sample(words, min(len(words), rng.randint(3, 6))))


def _sampled_scenes(conn: Connection, where: str = "TRUE") -> list[Any]:
    """Up to QUERIES_PER_OWNER scenes of READY videos per owner (MAX_QUERIES in all), in a fixed order."""
    return list(
        conn.execute(
            text(
                f"""SELECT * FROM (
                        SELECT s.*, s.id AS scene_id,
                               row_number() OVER (PARTITION BY s.owner_id ORDER BY md5(s.id::text || :seed)) AS n
                        FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY' WHERE {where}) x
                    WHERE n <= :per_owner ORDER BY md5(owner_id::text || :seed), n LIMIT :cap"""
            ),
            {"seed": SEED, "per_owner": QUERIES_PER_OWNER, "cap": MAX_QUERIES},
        )
    )


def _reciprocal_ranks(ranked: list[list[Any]], targets: list[Any]) -> list[float]:
    return [1.0 / (r.index(t) + 1) if t in r[:TOP_K] else 0.0 for r, t in zip(ranked, targets, strict=True)]


def _rank_scenes(conn: Connection, table: Any, items: list[KnownItem], vectors: np.ndarray, gen: tuple) -> list[float]:
    from heimdex_assets.search import SEMANTIC_CHANNELS, nearest_scenes

    channels = SEMANTIC_CHANNELS if table is scene_text_vectors else None
    ranked = [
        nearest_scenes(conn, table, i.owner_id, v, version=gen[0], model_id=gen[1], limit=TOP_K, channels=channels)
        for i, v in zip(items, vectors, strict=True)
    ]
    return _reciprocal_ranks(ranked, [i.target for i in items])


# Each gate: (conn, candidate key, active key or None, resources) -> (queries, candidate's reciprocal ranks,
# active's on the same queries, note); a list is None when this process cannot embed queries for that model.
RR = list[float] | None
Gate = Callable[[Connection, tuple, tuple | None, Mapping[str, Any]], tuple[int, RR, RR, str]]


def _text_gate(conn: Connection, cand: tuple, active: tuple | None, resources: Mapping[str, Any]):
    from heimdex_assets.search import SearchError, query_embedder

    items = []
    for s in _sampled_scenes(conn):
        words = query_words(s.id, s.transcript) or query_words(s.id, s.visual_description)
        if words:
            items.append(KnownItem(s.owner_id, s.id, words))
    if not items:
        return 0, None, None, "no scene has three content words"
    embedder = resources["text_embedder"]

    def embed(model_id: str) -> np.ndarray | None:
        try:
            chosen = query_embedder(embedder, model_id)
        except SearchError:
            return None
        if getattr(chosen, "resolved_provider", "local") == "local":
            return np.stack([chosen.embed_query(i.query) for i in items])  # NumPy MiniLM: no torch load
        return chosen.embed_texts([i.query for i in items]).vectors  # one batched request

    cand_vectors = embed(cand[1])
    if cand_vectors is None:
        return len(items), None, None, f"this process cannot embed queries for {cand[1]}"
    cand_rr = _rank_scenes(conn, scene_text_vectors, items, cand_vectors, cand)
    if active is None:
        return len(items), cand_rr, None, ""
    active_vectors = cand_vectors if active[1] == cand[1] else embed(active[1])
    if active_vectors is None:
        return len(items), cand_rr, None, f"this process cannot embed queries for {active[1]}"
    return len(items), cand_rr, _rank_scenes(conn, scene_text_vectors, items, active_vectors, active), ""


def _mirror_crop(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The query view of an image: mirrored, 5 % trimmed off each side (of ``box`` when given)."""
    if box is not None:
        x, y, w, h = box
        image = image.crop((x, y, x + w, y + h))
    w, h = image.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    return ImageOps.mirror(image.convert("RGB")).crop((dx, dy, w - dx, h - dy))


def _image_gate(table: Any, with_boxes: bool) -> Gate:
    def gate(conn: Connection, cand: tuple, active: tuple | None, resources: Mapping[str, Any]):
        clip, blobs = resources["clip"], resources["blobs"]
        items, images = [], []
        if with_boxes:  # one detection per sampled scene, from the candidate (the generation under test)
            rows = conn.execute(
                text(
                    """SELECT DISTINCT ON (p.scene_id) p.scene_id, p.owner_id, p.box_x, p.box_y, p.box_w, p.box_h,
                              s.thumbnail_uri, s.thumbnail_sha256
                       FROM scene_person_vectors p JOIN scenes s ON s.id = p.scene_id
                       WHERE p.step_version = :version AND p.model_id = :model
                       ORDER BY p.scene_id, p.detection_index"""
                ),
                {"version": cand[0], "model": cand[1]},
            ).all()
            rows = sorted(rows, key=lambda r: hashlib.md5(f"{r.scene_id}{SEED}".encode()).hexdigest())[:MAX_QUERIES]
        else:
            rows = _sampled_scenes(conn, "s.thumbnail_uri IS NOT NULL")
        for r in rows:
            try:
                image = blobs.read_declared_image(r.thumbnail_uri, r.thumbnail_sha256)
            except Exception:  # an unreadable thumbnail has no vector either: it is not a known item
                continue
            box = (r.box_x, r.box_y, r.box_w, r.box_h) if with_boxes else None
            items.append(KnownItem(r.owner_id, r.scene_id, None))
            images.append(_mirror_crop(image, box))
        if not items:
            return 0, None, None, "no readable thumbnail" + (" with a detected person" if with_boxes else "")
        own = person_identity(clip, resources["person_detector"]) if with_boxes else clip.model_id
        if own != cand[1]:
            return len(items), None, None, f"this process runs {own}, not the candidate's {cand[1]}"
        vectors = np.concatenate([clip.embed_images(images[i : i + 64]) for i in range(0, len(images), 64)])
        cand_rr = _rank_scenes(conn, table, items, vectors, cand)
        if active is None:
            return len(items), cand_rr, None, ""
        if active[1] != own:
            return len(items), cand_rr, None, f"this process cannot embed queries for {active[1]}"
        return len(items), cand_rr, _rank_scenes(conn, table, items, vectors, active), ""

    return gate


def _photo_ranks(conn: Connection, gen: tuple) -> list[float]:
    """Leave one out: each photo of a person with two photos or more, against the other photos."""
    rows = conn.execute(
        text(
            """WITH g AS (SELECT * FROM person_photo_vectors WHERE step_version = :version AND model_id = :model),
                    q AS (SELECT * FROM g WHERE person_id IN (SELECT person_id FROM g GROUP BY 1 HAVING count(*) > 1)
                          ORDER BY md5(photo_id::text || :seed) LIMIT :cap)
               SELECT q.person_id AS target, ARRAY(
                   SELECT o.person_id FROM g o WHERE o.owner_id = q.owner_id AND o.photo_id <> q.photo_id
                     AND o.dimension = q.dimension
                   GROUP BY o.person_id ORDER BY min(o.embedding <=> q.embedding), o.person_id LIMIT :k) AS ranked
               FROM q"""
        ),
        {"version": gen[0], "model": gen[1], "seed": SEED, "cap": MAX_QUERIES, "k": TOP_K},
    ).all()
    return _reciprocal_ranks([list(r.ranked) for r in rows], [r.target for r in rows])


def _photo_gate(conn: Connection, cand: tuple, active: tuple | None, resources: Mapping[str, Any]):
    cand_rr = _photo_ranks(conn, cand)
    if not cand_rr:
        return 0, None, None, "no person has two photos"
    # The same photos, ranked by the active generation's vectors (the sample is drawn from photo ids).
    active_rr = _photo_ranks(conn, active) if active is not None else None
    if active_rr is not None and len(active_rr) != len(cand_rr):
        return len(cand_rr), cand_rr, None, "the active generation has other photos"
    return len(cand_rr), cand_rr, active_rr, ""


GATES: dict[str, Gate] = {
    "scene_text": _text_gate,
    "scene_clip": _image_gate(scene_clip_vectors, with_boxes=False),
    "scene_person": _image_gate(scene_person_vectors, with_boxes=True),
    "person_photo": _photo_gate,
}


def evaluate(
    conn: Connection, step: Step, candidate: tuple[str, str], active: Any, resources: Mapping[str, Any]
) -> Evaluation | None:
    """The gate's verdict on ``candidate`` (step version, model) against ``active`` (a Generation or None);
    None for a step without a gate."""
    gate = GATES.get(step.name)
    if gate is None:
        return None
    margin = gate_margin()
    active_key = active.key if active is not None else None
    queries, cand_rr, active_rr, note = gate(conn, candidate, active_key, resources)
    cand_mrr = _mean(cand_rr)
    active_mrr = _mean(active_rr) if active is not None else None
    baseline = "measured" if active_mrr is not None else "none"
    stderr = _stderr([a - c for a, c in zip(active_rr, cand_rr, strict=True)]) if cand_rr and active_rr else 0.0
    if active is not None and active_mrr is None and cand_mrr is not None:
        stored = conn.execute(
            text(
                "SELECT evaluation->>'candidate_mrr' FROM generations "
                "WHERE step = :step AND step_version = :version AND model_id = :model"
            ),
            {"step": step.name, "version": active.version, "model": active.model_id},
        ).scalar()
        if stored is not None:
            active_mrr, baseline, stderr = float(stored), "stored at activation", _stderr(cand_rr)
    return Evaluation(step.name, queries, cand_mrr, active_mrr, margin, baseline, round(stderr, 4), note)


def _mean(values: RR) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _stderr(values: RR) -> float:
    """The standard error of the mean of ``values`` (0 below two values)."""
    if not values or len(values) < 2:
        return 0.0
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))
