import uuid

import dagster as dg
from sqlalchemy import text, update

from heimdex_assets.assets import scene_clip_embeddings, scene_text_embeddings
from heimdex_assets.db.tables import scenes
from heimdex_assets.freshness import summarize, video_partition_states
from heimdex_assets_tests.conftest import materialize_videos


def states(db, asset, model, **kw):
    with db.engine.connect() as conn:
        return {k: s.state for k, s in video_partition_states(conn, asset, model, **kw).items()}


def test_states_follow_materialisation_edits_and_a_step_version_bump(
    db, rows, resources, instance, clip, text_embedder
):
    owner = rows.owner()
    a, b = rows.video(owner, 2), rows.video(owner, 2)
    rows.video(owner, 2, status="PROCESSING")  # never counted
    text_model, clip_model = text_embedder.model_id, clip.model_id
    assert states(db, "scene_text_embeddings", text_model) == {str(a): "missing", str(b): "missing"}

    materialize_videos([scene_text_embeddings, scene_clip_embeddings], [str(a), str(b)], resources, instance)
    assert set(states(db, "scene_text_embeddings", text_model).values()) == {"fresh"}
    assert set(states(db, "scene_clip_embeddings", clip_model).values()) == {"fresh"}

    # An edited transcript makes exactly its video stale for text, and nothing for CLIP.
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.video_id == a).values(transcript="Edited words."))
    assert states(db, "scene_text_embeddings", text_model) == {str(a): "stale", str(b): "fresh"}
    assert set(states(db, "scene_clip_embeddings", clip_model).values()) == {"fresh"}

    # Rows of an older CLIP step version (as after a bump of that step) leave CLIP stale, text alone.
    with db.transaction() as conn:
        conn.execute(text("UPDATE scene_clip_vectors SET step_version = '2025-12-01'"))
    assert set(states(db, "scene_clip_embeddings", clip_model).values()) == {"stale"}
    assert states(db, "scene_text_embeddings", text_model)[str(b)] == "fresh"

    # Another model configured: every vector made by the old one is stale.
    assert set(states(db, "scene_text_embeddings", "text-embedding-3-small").values()) == {"stale"}


def test_a_broken_thumbnail_is_failed_not_stale_and_owner_scope_is_respected(
    db, rows, resources, instance, clip, tmp_path
):
    owner, other = rows.owner(), rows.owner()
    video = rows.video(owner, 2)
    theirs = rows.video(other, 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.video_id == video, scenes.c.scene_index == 0)
            .values(thumbnail_uri=str(broken), thumbnail_sha256=None)
        )
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    mine = states(db, "scene_clip_embeddings", clip.model_id, owner_id=owner)
    assert mine == {str(video): "failed"}
    assert str(theirs) not in mine
    with db.engine.connect() as conn:
        all_states = video_partition_states(conn, "scene_clip_embeddings", clip.model_id)
    assert summarize(all_states) == {"fresh": 0, "stale": 0, "missing": 1, "failed": 1}
    assert all_states[str(video)].failed_items == 1 and all_states[str(video)].items == 2


def test_owner_assets_and_the_search_index_follow_their_inputs(db, rows, resources, instance, clip, tmp_path):
    from PIL import Image

    from heimdex_assets.assets import person_photo_embeddings, person_query_embeddings, scene_search_index
    from heimdex_assets.demo import build_corpus, load_corpus
    from heimdex_assets.resources import OpenCvPersonDetector, SearchIndex

    corpus = build_corpus(tmp_path / "media", owners=2, videos_per_owner=1, scenes_per_video=2, processing_videos=0)
    with db.transaction() as conn:
        load_corpus(conn, corpus)
    mine, theirs = corpus.owners
    resources = resources | {
        "person_detector": OpenCvPersonDetector(),
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "scenes.sqlite")),
    }
    owner_keys = [str(o.id) for o in corpus.owners]
    instance.add_dynamic_partitions("owners", owner_keys)
    for key in owner_keys:
        dg.materialize(
            [person_photo_embeddings, person_query_embeddings],
            partition_key=key,
            resources=resources,
            instance=instance,
        )
    for asset in ("person_photo_embeddings", "person_query_embeddings"):
        assert set(states(db, asset, clip.model_id).values()) == {"fresh"}

    # A new reference photo: the owner's photo step is stale (its query follows once photos are done).
    person = mine.persons[0]
    new_photo = tmp_path / "new.png"
    Image.open(person.photos[0].uri).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new_photo)
    with db.transaction() as conn:
        conn.execute(
            text("INSERT INTO person_reference_photos (id, person_id, owner_id, uri) VALUES (:i, :p, :o, :u)"),
            {"i": uuid.uuid4(), "p": person.id, "o": mine.id, "u": str(new_photo)},
        )
    assert states(db, "person_photo_embeddings", clip.model_id) == {str(mine.id): "stale", str(theirs.id): "fresh"}
    dg.materialize([person_photo_embeddings], partition_key=str(mine.id), resources=resources, instance=instance)
    assert states(db, "person_query_embeddings", clip.model_id)[str(mine.id)] == "stale"
    assert states(db, "person_query_embeddings", clip.model_id)[str(theirs.id)] == "fresh"

    # The search index: fresh once indexed, stale for exactly the video whose scene was edited.
    video_keys = [str(v.id) for v in corpus.videos]
    assert set(states(db, "scene_search_index", "bm25").values()) == {"missing"}
    materialize_videos([scene_search_index], video_keys, resources, instance)
    assert set(states(db, "scene_search_index", "bm25").values()) == {"fresh"}
    edited = corpus.owners[0].videos[0]
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == edited.scenes[0].id).values(summary="A new summary."))
    assert states(db, "scene_search_index", "bm25") == {
        str(edited.id): "stale",
        str(corpus.owners[1].videos[0].id): "fresh",
    }
