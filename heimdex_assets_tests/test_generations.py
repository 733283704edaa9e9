"""Generations: search keeps answering from the active generation while the next one is built beside it,
flips to it once it covers every partition, and rolls back exactly."""

import random
import threading
from datetime import timedelta

import pytest
from sqlalchemy import event, text

from heimdex_assets.assets import scene_text_embeddings
from heimdex_assets.cli import main
from heimdex_assets.evaluation import Evaluation
from heimdex_assets.freshness import partition_states
from heimdex_assets.generations import (
    ActivationError,
    GateRefusedError,
    activate,
    active_generations,
    prune,
    rollback,
)
from heimdex_assets.models import expected_models, record_models
from heimdex_assets.resources import SearchIndex, TextEmbedder
from heimdex_assets.resources.text_embedder import LOCAL_MODEL_ID
from heimdex_assets.search import search_scenes
from heimdex_assets.steps import SCENE_TEXT
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.fake_openai import FakeOpenAI

QUERIES = ("the tide turns at the harbour", "boats at dawn", "the narrator explains")
OPENAI_MODEL = "text-embedding-3-small"


NOUNS = """
anchor lantern glacier orchard violin falcon canyon meadow harbour lighthouse volcano desert
compass saddle tractor bakery cathedral monastery vineyard ferry quarry bicycle carnival telescope
pottery blacksmith fountain greenhouse observatory tunnel bridge avalanche orchestra museum library
castle windmill lagoon reef jungle tundra prairie marsh waterfall geyser canal market stadium
airport railway factory laboratory kitchen garden chimney attic cellar balcony courtyard
""".split()  # noqa: SIM905


def varied_videos(rows, owner, n_videos: int, n_scenes: int, seed: int = 7) -> list[str]:
    """Videos whose scenes each name a few nouns of their own (and no other word the gate would draw), so
    that a scene can be told from another by any good model."""
    rng = random.Random(seed)
    ids = []
    for _ in range(n_videos):
        video = rows.video(owner, n_scenes=0)
        for i in range(n_scenes):
            words = rng.sample(NOUNS, 6)
            rows.scene(
                video,
                owner,
                i,
                transcript=f"The {words[0]}, the {words[1]} and the {words[2]} by the {words[3]}.",
                visual_description=f"A {words[4]} by a {words[5]}.",
            )
        ids.append(str(video))
    return ids


def results(db, resources, owner, embedder):
    return {
        q: [r.scene_id for r in search_scenes(db, owner, q, mode="semantic", text_embedder=embedder, **resources)]
        for q in QUERIES
    }


def test_search_serves_the_active_generation_while_the_next_is_built_then_flips_and_rolls_back(
    db, rows, resources, instance, tmp_path, fake_openai
):
    owner = rows.owner()
    videos = varied_videos(rows, owner, 4, 3)
    search = {"clip": resources["clip"], "search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite"))}
    local = resources["text_embedder"]
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    with db.engine.connect() as conn:
        assert active_generations(conn)["scene_text"].key == (SCENE_TEXT.version, LOCAL_MODEL_ID)
    before = results(db, search, owner, local)
    assert all(before.values())

    # The deployment moves to another text model; the new generation is built beside the old one.
    openai = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url)
    with db.transaction() as conn:
        record_models(conn, {"scene_text": OPENAI_MODEL}, "test")
    new = resources | {"text_embedder": openai}
    materialize_videos([scene_text_embeddings], videos[:2], new, instance)
    # Half built: searches, even from a process configured for the new model, read the old generation,
    # and every vector query they issue is of the old model, with a query vector of its dimension (384).
    issued = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "scene_text_vectors" in statement:
            issued.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        assert results(db, search, owner, openai) == before
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    assert len(issued) == len(QUERIES)
    assert all(p["model"] == LOCAL_MODEL_ID and "CAST(%(q)s AS vector(384))" in s for s, p in issued)
    with db.transaction() as conn, pytest.raises(ActivationError, match=r"2 stale of 4.*--force"):
        activate(conn, SCENE_TEXT, expected_models(conn, new | search), actor="test", reason="too early")
    with db.engine.connect() as conn:
        assert active_generations(conn)["scene_text"].model_id == LOCAL_MODEL_ID

    materialize_videos([scene_text_embeddings], videos[2:], new, instance)  # complete: it flips by itself
    with db.engine.connect() as conn:
        assert active_generations(conn)["scene_text"].key == (SCENE_TEXT.version, OPENAI_MODEL)
        counted = dict(
            conn.execute(
                text("SELECT model_id, count(*) FROM scene_text_vectors GROUP BY model_id ORDER BY model_id")
            ).all()
        )
    assert counted == {LOCAL_MODEL_ID: 24, OPENAI_MODEL: 24}  # both generations kept, side by side
    after = results(db, search, owner, openai)
    assert after != before and all(after.values())

    with db.transaction() as conn:
        assert rollback(conn, "scene_text", actor="test", reason="worse").model_id == LOCAL_MODEL_ID
    assert results(db, search, owner, openai) == before  # exactly the old results, old query model too
    with db.transaction() as conn:
        flipped = activate(conn, SCENE_TEXT, expected_models(conn, new | search), actor="test", reason="again")
    assert flipped.model_id == OPENAI_MODEL
    assert results(db, search, owner, openai) == after
    with db.engine.connect() as conn:
        events = conn.execute(
            text("SELECT action, model_id, actor FROM generation_events WHERE step = 'scene_text' ORDER BY id")
        ).all()
    assert [(e.action, e.model_id) for e in events] == [
        ("activate", LOCAL_MODEL_ID),
        ("activate", OPENAI_MODEL),
        ("rollback", LOCAL_MODEL_ID),
        ("activate", OPENAI_MODEL),
    ]


def test_rollback_without_a_previous_generation_is_refused(db):
    with db.transaction() as conn, pytest.raises(ActivationError, match="no previous generation"):
        rollback(conn, "scene_clip", actor="test", reason="none")


def test_prune_deletes_exactly_the_expired_generations_rows_never_the_active_or_previous(
    db, rows, resources, instance, tmp_path, fake_openai
):
    owner = rows.owner()
    videos = varied_videos(rows, owner, 3, 2)
    search = {"search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite"))}
    materialize_videos([scene_text_embeddings], videos, resources, instance)  # A: local, active
    for model in (OPENAI_MODEL, "text-embedding-ada-002"):  # B, then C: A retired, B previous, C active
        embedder = TextEmbedder(
            provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url, openai_model=model
        )
        with db.transaction() as conn:
            record_models(conn, {"scene_text": model}, "test")
        current = resources | {"text_embedder": embedder}
        materialize_videos([scene_text_embeddings], videos, current, instance)

    def per_model():
        with db.engine.connect() as conn:
            return dict(conn.execute(text("SELECT model_id, count(*) FROM scene_text_vectors GROUP BY 1")).all())

    before = per_model()
    assert before == {LOCAL_MODEL_ID: 12, OPENAI_MODEL: 12, "text-embedding-ada-002": 12}
    with db.engine.connect() as conn:
        models = expected_models(conn, current | search)
    assert prune(db, search["search_index"], models) == []  # A retired just now: within the grace period
    assert per_model() == before
    report = prune(db, search["search_index"], models, grace=timedelta(0))
    assert [(r["step"], r["model_id"], r["rows_deleted"]) for r in report] == [("scene_text", LOCAL_MODEL_ID, 12)]
    assert per_model() == {OPENAI_MODEL: 12, "text-embedding-ada-002": 12}
    with db.engine.connect() as conn:
        ledger_models = set(
            conn.execute(text("SELECT DISTINCT model_id FROM partition_ledger WHERE step = 'scene_text'")).scalars()
        )
        assert ledger_models == {OPENAI_MODEL, "text-embedding-ada-002"}
        states = partition_states(conn, SCENE_TEXT, models)
    # Pruning is no change to the generations kept: every partition stays fresh, without a recount.
    assert {s.state for s in states.values()} == {"fresh"}
    assert prune(db, search["search_index"], models, grace=timedelta(0)) == []  # B (previous) and C stay


def test_a_worse_candidate_is_refused_by_the_gate_with_its_figures_and_force_overrides_it(
    db, rows, resources, instance, tmp_path, database_url, monkeypatch, capsys
):
    owner = rows.owner()
    videos = varied_videos(rows, owner, 4, 5)
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    with db.engine.connect() as conn:
        first = active_generations(conn)["scene_text"]
    # The first generation has nothing to compare with: it is measured and activated, its figure kept.
    assert first.evaluation["baseline"] == "none" and first.evaluation["queries"] == 20
    assert first.evaluation["candidate_mrr"] >= 0.5

    server = FakeOpenAI(random_vectors=True).start()  # a model whose vectors rank nothing
    try:
        worse = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=server.url)
        with db.transaction() as conn:
            record_models(conn, {"scene_text": OPENAI_MODEL}, "test")
        new = resources | {"text_embedder": worse, "search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite"))}
        run = materialize_videos([scene_text_embeddings], videos, new, instance)
        gate = run.asset_materializations_for_node("scene_text_embeddings")[0].metadata["generation_gate"].data
        assert gate["activated"] is False
        assert gate["evaluation"]["baseline"] == "measured" and gate["evaluation"]["passed"] is False
        assert gate["evaluation"]["active_mrr"] == first.evaluation["candidate_mrr"]  # same queries, same model
        assert gate["evaluation"]["candidate_mrr"] < first.evaluation["candidate_mrr"] - 0.05
        with db.engine.connect() as conn:
            assert active_generations(conn)["scene_text"].model_id == LOCAL_MODEL_ID  # search unchanged
            refused = conn.execute(
                text("SELECT model_id, details FROM generation_events WHERE action = 'gate_refused'")
            ).all()
        assert [(r.model_id, r.details["evaluation"]["candidate_mrr"]) for r in refused] == [
            (OPENAI_MODEL, gate["evaluation"]["candidate_mrr"])
        ]
        # Nothing changed since: a second run does not pay for the gate again, the verdict holds.
        again = materialize_videos([scene_text_embeddings], videos, new, instance)
        gate2 = again.asset_materializations_for_node("scene_text_embeddings")[0].metadata["generation_gate"].data
        assert "unchanged since" in gate2["why_not"]
        with db.engine.connect() as conn:
            assert (
                conn.execute(text("SELECT count(*) FROM generation_events WHERE action = 'gate_refused'")).scalar() == 1
            )

        with (
            db.transaction() as conn,
            pytest.raises(GateRefusedError, match=r"refused, gate refused: MRR@10 .*--force"),
        ):
            activate(conn, SCENE_TEXT, expected_models(conn, new), actor="test", reason="try", resources=new)
        # What an operator sees: `heimdex status` of a process configured like the workers.
        env = {
            "HEIMDEX_DATABASE_URL": database_url,
            "HEIMDEX_HOME": str(tmp_path / "home"),
            "HEIMDEX_TEXT_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": server.url,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert f"candidate 2026-01-06 / {OPENAI_MODEL}: 40/40 items done, 0 failed" in out
        mrr = gate["evaluation"]["candidate_mrr"]
        assert f"refused by the evaluation gate: MRR@10 {mrr} vs active {first.evaluation['candidate_mrr']}" in out

        with db.transaction() as conn:
            forced = activate(
                conn, SCENE_TEXT, expected_models(conn, new), actor="test", reason="ops", force=True, resources=new
            )
        assert forced.model_id == OPENAI_MODEL and forced.evaluation["passed"] is False  # figures kept
    finally:
        server.stop()


def test_flips_are_atomic_under_concurrent_searches(db, rows, resources, instance, tmp_path, fake_openai):
    owner = rows.owner()
    videos = varied_videos(rows, owner, 3, 4)
    search = {"clip": resources["clip"], "search_index": SearchIndex(sqlite_path=str(tmp_path / "s.sqlite"))}
    materialize_videos([scene_text_embeddings], videos, resources, instance)
    openai = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url)
    with db.transaction() as conn:
        record_models(conn, {"scene_text": OPENAI_MODEL}, "test")
    new = resources | {"text_embedder": openai}
    materialize_videos([scene_text_embeddings], videos, new, instance)  # flips to the new generation
    queries = ("lantern glacier", "violin by the canyon", "a windmill")

    def answers():
        return {
            q: [r.scene_id for r in search_scenes(db, owner, q, mode="semantic", text_embedder=openai, **search)]
            for q in queries
        }

    after = answers()
    with db.transaction() as conn:
        rollback(conn, "scene_text", actor="test", reason="compare")
    before = answers()
    assert all(before[q] != after[q] for q in queries)  # two generations that rank differently

    seen, stop = [], threading.Event()

    def search_throughout():
        while not stop.is_set():
            for q in queries:
                seen.append((q, search_scenes(db, owner, q, mode="semantic", text_embedder=openai, **search)))

    thread = threading.Thread(target=search_throughout)
    thread.start()
    try:
        flips = 0
        while flips < 30 or len(seen) < 60:  # flips interleaved with searches, whatever the machine's speed
            with db.transaction() as conn:
                activate(conn, SCENE_TEXT, expected_models(conn, new | search), actor="test", reason="flip")
            with db.transaction() as conn:
                rollback(conn, "scene_text", actor="test", reason="flop")
            flips += 2
    finally:
        stop.set()
        thread.join()
    complete = {q: (before[q], after[q]) for q in queries}
    mixed = [(q, [r.scene_id for r in found]) for q, found in seen if [r.scene_id for r in found] not in complete[q]]
    assert mixed == []  # every answer is exactly one generation's


@pytest.mark.parametrize(
    ("candidate", "active", "stderr", "passed"),
    [
        (0.917, 1.0, 0.083, True),  # 6 queries, one ranked second: within noise
        (0.80, 0.97, 0.02, False),  # a clear drop on many queries
        (0.94, 0.97, 0.0, True),  # within the margin
        (None, 0.97, 0.0, True),  # nothing measured: nothing to refuse on
    ],
)
def test_the_gate_refuses_a_drop_beyond_both_the_margin_and_the_noise(candidate, active, stderr, passed):
    ev = Evaluation("scene_text", 6, candidate, active, 0.05, "measured", stderr)
    assert ev.passed is passed
    assert ("refused" in ev.summary()) is not passed
