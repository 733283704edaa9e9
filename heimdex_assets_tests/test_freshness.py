"""Freshness counted both ways, on a corpus with every edge: what an asset embeds is exactly what
freshness counts, each drift turns exactly its partition stale, and one run (or one reprocess)
makes everything fresh again with no stray row left."""

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import text, update

from heimdex_assets.assets import DERIVED_ASSETS, OWNER_ASSETS, VIDEO_ASSETS, person_photo_embeddings
from heimdex_assets.db.tables import person_reference_photos, scenes
from heimdex_assets.demo import build_corpus, load_corpus
from heimdex_assets.freshness import partition_states, summarize
from heimdex_assets.launch import materialize_ranges
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess, run_plan
from heimdex_assets.resources import SearchIndex
from heimdex_assets.steps import STEPS, step


@pytest.fixture
def corpus_env(db, resources, instance, tmp_path):
    """The demo corpus, small, plus every edge: a blank channel, a scene without a thumbnail, an
    unreadable thumbnail with a declared hash, a PROCESSING video, a person without a READY photo."""
    corpus = build_corpus(tmp_path / "media", owners=2, videos_per_owner=2, scenes_per_video=3, processing_videos=1)
    with db.transaction() as conn:
        load_corpus(conn, corpus)
    resources = resources | {"search_index": SearchIndex(sqlite_path=str(tmp_path / "search.sqlite"))}
    ready = [v for v in corpus.videos if v.status == "READY"]
    blank, no_thumb, broken = ready[0].scenes[0], ready[0].scenes[1], ready[1].scenes[0]
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"this is not an image")
    lonely = corpus.owners[1].persons[0]
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == blank.id).values(transcript="  \n "))
        conn.execute(update(scenes).where(scenes.c.id == no_thumb.id).values(thumbnail_uri=None, thumbnail_sha256=None))
        conn.execute(
            update(scenes)
            .where(scenes.c.id == broken.id)
            .values(thumbnail_uri=str(unreadable), thumbnail_sha256=hashlib.sha256(b"what it should be").hexdigest())
        )
        conn.execute(
            update(person_reference_photos)
            .where(person_reference_photos.c.person_id == lonely.id)
            .values(uri=str(unreadable), sha256=None)
        )
    env = {
        "corpus": corpus,
        "resources": resources,
        "instance": instance,
        "db": db,
        "ready": ready,
        "broken_video": ready[1].id,
        "unreadable": unreadable,
        "tmp": tmp_path,
    }
    materialize_all(env)
    return env


def materialize_all(env, assets=None):
    """Every asset for every READY video and owner, video assets first (as the demo does)."""
    instance = env["instance"]
    videos = sorted(str(v.id) for v in env["ready"])
    owners = sorted(str(o.id) for o in env["corpus"].owners)
    for name, keys in (("videos", videos), ("owners", owners)):
        new = [k for k in keys if k not in set(instance.get_dynamic_partitions(name))]
        instance.add_dynamic_partitions(name, new)
    for group, keys in ((VIDEO_ASSETS, videos), (OWNER_ASSETS, owners)):
        chosen = [a for a in group if assets is None or a in assets]
        if chosen:
            ordered = sorted(keys)
            outcomes = materialize_ranges(chosen, [ordered], env["resources"], instance)
            assert all(o.success for o in outcomes), [o.error for o in outcomes]


def models_of(env):
    with env["db"].engine.connect() as conn:
        return expected_models(conn, env["resources"])


def states(env, name, models=None):
    with env["db"].engine.connect() as conn:
        return {k: s.state for k, s in partition_states(conn, step(name), models or models_of(env)).items()}


def row_items(env, name):
    """(partition, item) of every row of the step's current generation, and of every failure."""
    s, models = step(name), models_of(env)
    with env["db"].engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT r.{s.row_partition_column} AS p, {s.item_key} AS item_id, r.input_sha256 "
                f"FROM {s.table.name} r WHERE r.step_version = :version AND r.model_id = :model"
            ),
            {"version": s.version, "model": models[name]},
        ).all()
        failed = conn.execute(
            text("SELECT partition_id AS p, item_id, input_sha256 FROM embedding_failures WHERE step = :step"),
            {"step": name},
        ).all()
    return {(r.p, r.item_id, r.input_sha256) for r in rows}, {(r.p, r.item_id, r.input_sha256) for r in failed}


def items_of(env, name):
    s, models = step(name), models_of(env)
    partitions = [v.id for v in env["ready"]] if s.partitioning == "video" else [o.id for o in env["corpus"].owners]
    with env["db"].engine.connect() as conn:
        return {(i.partition_id, i.item_id, i.input_sha256) for i in s.items(conn, models, partitions)}


def assert_rows_are_exactly_the_items(env):
    for s in STEPS:
        rows, failed = row_items(env, s.name)
        assert rows | failed == items_of(env, s.name), s.name
        assert not rows & failed, s.name


def test_what_each_asset_embeds_is_exactly_what_freshness_counts(corpus_env):
    env = corpus_env
    assert_rows_are_exactly_the_items(env)
    broken = str(env["broken_video"])
    for s in STEPS:
        got = states(env, s.name)
        assert "stale" not in got.values() and "missing" not in got.values(), (s.name, got)
        with env["db"].engine.connect() as conn:
            counted = partition_states(conn, s, models_of(env))
        assert sum(c.items for c in counted.values()) == len(items_of(env, s.name)), s.name
    # The unreadable thumbnail (declared hash) is failed, for both steps that read it, and nothing else is.
    for name in ("scene_clip", "scene_person"):
        assert {k for k, v in states(env, name).items() if v == "failed"} == {broken}
    # The person whose only photo is unreadable: its photo failed, and it has no query item nor vector.
    lonely = env["corpus"].owners[1].persons[0]
    assert states(env, "person_photo")[str(lonely.owner_id)] == "failed"
    assert not any(item == str(lonely.id) for _, item, _ in row_items(env, "person_query")[0])
    # The blank transcript and the scene without a thumbnail are no items, and no failures.
    blank, no_thumb = env["ready"][0].scenes[0], env["ready"][0].scenes[1]
    assert f"{blank.id}:transcript" not in {i for _, i, _ in items_of(env, "scene_text")}
    assert str(no_thumb.id) not in {i for _, i, _ in items_of(env, "scene_clip") | row_items(env, "scene_clip")[1]}


def drift_edited_transcript(env):
    scene = env["ready"][2].scenes[1]
    with env["db"].transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == scene.id).values(transcript="The narrator now speaks of owls.")
        )
    return scene.video_id, {"scene_text", "scene_search"}


def drift_cleared_transcript(env):
    scene = env["ready"][2].scenes[2]
    with env["db"].transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == scene.id).values(transcript=""))
    return scene.video_id, {"scene_text", "scene_search"}


def drift_deleted_scene(env):
    scene = env["ready"][3].scenes[0]
    with env["db"].transaction() as conn:
        conn.execute(text("DELETE FROM scenes WHERE id = :s"), {"s": scene.id})
    return scene.video_id, {"scene_text", "scene_clip", "scene_person", "scene_search"}


def drift_new_thumbnail(env):
    scene = env["ready"][2].scenes[0]
    moved = env["tmp"] / "moved.png"
    moved.write_bytes(Path(scene.thumbnail_uri).read_bytes())
    with env["db"].transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == scene.id).values(thumbnail_uri=str(moved), thumbnail_sha256=None)
        )
    return scene.video_id, {"scene_clip", "scene_person"}


def drift_photos_gone(env):
    person = env["corpus"].owners[0].persons[0]
    with env["db"].transaction() as conn:
        conn.execute(text("DELETE FROM person_reference_photos WHERE person_id = :p"), {"p": person.id})
    return person.owner_id, {"person_photo", "person_query"}


@pytest.mark.parametrize(
    "drift",
    [drift_edited_transcript, drift_cleared_transcript, drift_deleted_scene, drift_new_thumbnail, drift_photos_gone],
)
def test_each_drift_turns_exactly_its_partition_stale_and_one_run_makes_it_fresh(corpus_env, drift):
    env = corpus_env
    before = {s.name: states(env, s.name) for s in STEPS}
    partition, stale_steps = drift(env)
    for s in STEPS:
        expected = before[s.name] | ({str(partition): "stale"} if s.name in stale_steps else {})
        assert states(env, s.name) == expected, s.name
    materialize_all(env)
    for s in STEPS:
        assert states(env, s.name) == before[s.name], s.name
    assert_rows_are_exactly_the_items(env)


def test_a_deleted_scene_leaves_no_row_and_no_document(corpus_env):
    env = corpus_env
    video_id, _ = drift_deleted_scene(env)
    gone = str(env["ready"][3].scenes[0].id)
    materialize_all(env)
    index = env["resources"]["search_index"]
    assert index.get_documents(step("scene_search").version, [gone]) == {}
    with env["db"].engine.connect() as conn:
        for s in STEPS[:4]:
            n = conn.execute(text(f"SELECT count(*) FROM {s.table.name} WHERE scene_id = :s"), {"s": gone}).scalar()
            assert n == 0, s.name
        assert (
            conn.execute(
                text("SELECT count(*) FROM scene_search_documents WHERE video_id = :v"), {"v": video_id}
            ).scalar()
            == len(env["ready"][3].scenes) - 1
        )


def test_another_text_model_makes_every_text_partition_stale_and_nothing_else(corpus_env):
    env = corpus_env
    models = models_of(env) | {"scene_text": "text-embedding-3-small"}
    assert set(states(env, "scene_text", models).values()) == {"stale"}
    assert "stale" not in states(env, "scene_clip", models).values()


def test_a_failure_waits_for_its_backoff_and_is_due_after_it(corpus_env):
    env = corpus_env
    broken = str(env["broken_video"])
    with env["db"].engine.connect() as conn:
        plan = plan_reprocess(conn, ReprocessRequest(scope="all"), models_of(env))
    assert broken not in plan.assets["scene_clip_embeddings"].partitions
    with env["db"].transaction() as conn:
        # Time passes: the backoff recorded with the failure (and in its partition's ledger) is over.
        for table in ("embedding_failures", "partition_ledger"):
            conn.execute(text(f"UPDATE {table} SET retry_at = retry_at - interval '8 days' WHERE step = 'scene_clip'"))
        plan = plan_reprocess(conn, ReprocessRequest(scope="all"), models_of(env))
    assert states(env, "scene_clip")[broken] == "stale"
    assert plan.assets["scene_clip_embeddings"].partitions == [broken]
    with env["db"].engine.connect() as conn:
        retry = plan_reprocess(conn, ReprocessRequest(scope="all", retry_failed=True), models_of(env))
    assert broken in retry.assets["scene_person_embeddings"].partitions  # failed, and retried on request


def reprocess_owner(env, owner_id, **flags):
    with env["db"].engine.connect() as conn:
        plan = plan_reprocess(conn, ReprocessRequest(scope="owner", owner_id=owner_id, **flags), models_of(env))
    outcomes = run_plan(plan, env["resources"], env["instance"])
    assert all(o.success for runs in outcomes.values() for o in runs)
    return plan


def test_one_reprocess_after_a_photo_changes_leaves_every_asset_fresh(corpus_env):
    """The issue's reproduction: break a photo, force a reprocess, restore it, retry failed: all fresh."""
    env = corpus_env
    owner = env["corpus"].owners[0]
    photo = Path(owner.persons[0].photos[0].uri)
    original = photo.read_bytes()
    photo.write_bytes(b"overwritten with text")
    reprocess_owner(env, owner.id, force=True)
    assert states(env, "person_photo")[str(owner.id)] == "failed"
    assert states(env, "person_query")[str(owner.id)] == "fresh"
    photo.write_bytes(original)
    plan = reprocess_owner(env, owner.id, retry_failed=True)
    assert str(owner.id) in plan.assets["person_query_embeddings"].partitions  # planned with its upstream
    for s in STEPS:
        assert states(env, s.name).get(str(owner.id), "fresh") == "fresh", s.name
    assert_rows_are_exactly_the_items(env)


def test_one_reprocess_after_a_run_killed_mid_way_leaves_every_asset_fresh(corpus_env):
    """A run that wrote the photo vectors and died before the query vectors: one reprocess finishes it."""
    env = corpus_env
    owner = env["corpus"].owners[0]
    photo = Path(owner.persons[0].photos[0].uri)
    photo.write_bytes(photo.read_bytes() + b"\0")  # new bytes (the image still decodes), declared below
    with env["db"].transaction() as conn:
        conn.execute(
            update(person_reference_photos)
            .where(person_reference_photos.c.id == owner.persons[0].photos[0].id)
            .values(sha256=hashlib.sha256(photo.read_bytes()).hexdigest())
        )
    materialize_all(env, assets=[person_photo_embeddings])  # ... and the run died here
    assert states(env, "person_query")[str(owner.id)] == "stale"
    plan = reprocess_owner(env, owner.id)
    assert plan.assets["person_query_embeddings"].partitions == [str(owner.id)]
    for s in STEPS:
        assert states(env, s.name).get(str(owner.id), "fresh") == "fresh", s.name
    assert_rows_are_exactly_the_items(env)


def test_an_owner_scope_reads_only_that_owners_partitions(corpus_env):
    env = corpus_env
    mine, theirs = env["corpus"].owners
    with env["db"].engine.connect() as conn:
        for s in STEPS:
            got = partition_states(conn, s, models_of(env), owner_id=mine.id)
            theirs_keys = {str(v.id) for v in theirs.videos} | {str(theirs.id)}
            assert got and not set(got) & theirs_keys, s.name


def test_status_summary_counts_every_state(corpus_env):
    env = corpus_env
    with env["db"].engine.connect() as conn:
        got = summarize(partition_states(conn, step("scene_clip"), models_of(env)))
    assert got == {"fresh": len(env["ready"]) - 1, "stale": 0, "missing": 0, "failed": 1}


def test_every_derived_asset_is_a_step():
    assert {a.key.to_user_string() for a in DERIVED_ASSETS} == {s.asset_key for s in STEPS}
