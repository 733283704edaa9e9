"""Tenant isolation, as a property: a reprocess scoped to one owner (or one of its videos) leaves every row of
every other owner exactly as it was, whatever the corpus, the scope, ``force`` and the steps chosen."""

import uuid
from pathlib import Path

import dagster as dg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, text, update

from heimdex_assets.assets import scene_clip_embeddings, scene_text_embeddings
from heimdex_assets.db.tables import scenes
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess, run_plan
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets_tests.conftest import ALL_TABLES, SourceRows, materialize_videos, render_thumbnail

TRANSCRIPTS = {"words": "The ferry leaves the harbour at {n} past six.", "blank": "  \n ", "none": None}
# One scene: its transcript, whether it is edited after the first build (stale text and thumbnail), and
# whether its thumbnail is missing (CLIP fails on it: a failure row, in backoff).
SCENE = st.tuples(st.sampled_from(sorted(TRANSCRIPTS)), st.booleans(), st.booleans())
# Owners → videos → scenes: 2-3 owners, 1-3 videos each, 0-3 scenes each.
CORPUS = st.lists(st.lists(st.lists(SCENE, max_size=3), min_size=1, max_size=3), min_size=2, max_size=3)
REQUEST = st.fixed_dictionaries(
    {
        "scope": st.sampled_from(["owner", "video"]),
        "owner": st.integers(0, 2),
        "video": st.integers(0, 2),
        "force": st.booleans(),
        "steps": st.sampled_from([("scene_text",), ("scene_clip",), ("scene_text", "scene_clip")]),
    }
)


# Stamps of the owners' partitions: the owners themselves and their videos.
OWN_STAMPS = "partition_id = ANY(:o) OR partition_id IN (SELECT id FROM videos WHERE owner_id = ANY(:o))"


def owner_tables(conn: Connection) -> list[str]:
    """Every table with an owner column: what a tenant owns, derived rows, failures and ledger included."""
    q = "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public' AND column_name = 'owner_id'"
    return sorted(conn.execute(text(q)).scalars())


def rows_of(db: AppDatabase, owners: list[uuid.UUID]) -> dict[str, list[str]]:
    """Each table's rows of ``owners`` as text, sorted: equal means byte-identical, timestamps and vectors too."""
    with db.engine.connect() as conn:
        where = {t: "owner_id = ANY(:o)" for t in owner_tables(conn)} | {
            "owners": "id = ANY(:o)",
            "input_stamps": OWN_STAMPS,
        }
        return {
            t: list(conn.execute(text(f"SELECT r::text FROM {t} r WHERE {w} ORDER BY 1"), {"o": owners}).scalars())
            for t, w in where.items()
        }


def build(rows: SourceRows, media: Path, corpus: list) -> tuple[dict[uuid.UUID, list[uuid.UUID]], list[uuid.UUID]]:
    """The corpus's owners (→ their videos) and scenes, as the product writes them; and the scenes to edit."""
    owners: dict[uuid.UUID, list[uuid.UUID]] = {}
    edits: list[uuid.UUID] = []
    for o, videos in enumerate(corpus):
        owner = rows.owner(f"owner {o}")
        owners[owner] = []
        for scene_specs in videos:
            video = rows.video(owner, 0)
            owners[owner].append(video)
            for i, (transcript, edited, missing) in enumerate(scene_specs):
                fields: dict = {"transcript": TRANSCRIPTS[transcript] and TRANSCRIPTS[transcript].format(n=i)}
                if missing:
                    fields |= {"thumbnail_uri": str(media / f"missing-{uuid.uuid4()}.png"), "thumbnail_sha256": None}
                scene = rows.scene(video, owner, i, **fields)
                if edited:
                    edits.append(scene)
    return owners, edits


def edit(db: AppDatabase, media: Path, scene_ids: list[uuid.UUID]) -> None:
    """New words and a new thumbnail for each scene: stale for both steps, in every owner alike."""
    for n, scene_id in enumerate(scene_ids):
        values: dict = {"transcript": f"Revised: the tide turned {n} times."}
        with db.engine.connect() as conn:
            uri = conn.execute(text("SELECT thumbnail_uri FROM scenes WHERE id = :s"), {"s": scene_id}).scalar()
        if "missing-" not in uri:
            values["thumbnail_sha256"] = render_thumbnail(media / f"{scene_id}.png", 10_000 + n)
        with db.transaction() as conn:
            conn.execute(update(scenes).where(scenes.c.id == scene_id).values(**values))


@settings(
    max_examples=10,
    deadline=None,
    database=None,  # no example store to replay from: a failure prints the example and its seed
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # the explain phase reruns a failure for minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(corpus=CORPUS, ask=REQUEST)
def test_a_scoped_reprocess_leaves_every_other_owners_rows_byte_identical(db, rows, resources, tmp_path, corpus, ask):
    with db.transaction() as conn:  # one database per example, not per test
        conn.execute(text(f"TRUNCATE {ALL_TABLES} CASCADE"))
    media = tmp_path / "media"
    # The plan asks every step's model, the search index's too (it is not run: only text and CLIP are chosen).
    resources = resources | {"search_index": SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite"))}
    owners, edits = build(rows, media, corpus)
    all_videos = [str(v) for vs in owners.values() for v in vs]
    owner = list(owners)[ask["owner"] % len(owners)]
    video = owners[owner][ask["video"] % len(owners[owner])]
    others = [o for o in owners if o != owner]

    with dg.instance_for_test() as instance:  # a fresh one: no partitions of earlier examples in the ranges
        # Everyone's rows exist (vectors, failures of missing thumbnails, ledger), then go stale alike.
        materialize_videos([scene_text_embeddings, scene_clip_embeddings], all_videos, resources, instance)
        edit(db, media, edits)
        before = rows_of(db, others)
        tables = {"scenes", "scene_text_vectors", "scene_clip_vectors", "embedding_failures", "partition_ledger"}
        assert tables <= set(before)

        scoped = {"video_id": video} if ask["scope"] == "video" else {}
        req = ReprocessRequest(scope=ask["scope"], owner_id=owner, force=ask["force"], steps=ask["steps"], **scoped)
        with db.engine.connect() as conn:
            models = expected_models(conn, resources)
            plan = plan_reprocess(conn, req, models)
        outcomes = run_plan(plan, resources, instance)

        assert all(o.success for runs in outcomes.values() for o in runs)
        assert rows_of(db, others) == before
        # Not vacuous: the scope itself was redone, nothing of its selected steps is left stale or missing.
        with db.engine.connect() as conn:
            again = plan_reprocess(conn, ReprocessRequest(scope=ask["scope"], owner_id=owner, **scoped), models)
        selected = {"scene_text": "scene_text_embeddings", "scene_clip": "scene_clip_embeddings"}
        for step in ask["steps"]:
            assert again.assets[selected[step]].partitions == [], (step, again.assets[selected[step]].states)
