import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text, update

from heimdex_assets.assets import scene_clip_embeddings
from heimdex_assets.db.tables import embedding_failures, scene_clip_vectors, scenes
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import materialize_videos


def clip_rows(db, video_id=None):
    q = select(scene_clip_vectors).order_by(scene_clip_vectors.c.scene_id)
    if video_id is not None:
        q = q.where(scene_clip_vectors.c.video_id == video_id)
    with db.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(q)]


def test_materialising_a_partition_writes_one_unit_vector_per_scene(db, rows, resources, instance, clip):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=4)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)

    written = clip_rows(db)
    with db.engine.connect() as conn:
        scene_rows = {r.id: r for r in conn.execute(select(scenes).where(scenes.c.video_id == video))}
    assert sorted(r["scene_id"] for r in written) == sorted(scene_rows)
    for r in written:
        vector = np.asarray(r["embedding"])
        assert vector.shape == (clip.dimension,) == (r["dimension"],)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
        assert r["step_version"] == SPEC.step("scene_clip").version
        assert r["model_id"] == clip.model_id and r["model_id"].startswith("open_clip:heimdex-tiny@sha256:")
        thumb = scene_rows[r["scene_id"]].thumbnail_uri
        assert r["input_sha256"] == hashlib.sha256(Path(thumb).read_bytes()).hexdigest()
        assert r["owner_id"] == owner and r["video_id"] == video


def test_second_run_changes_nothing(db, rows, resources, instance):
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    first = clip_rows(db)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    assert clip_rows(db) == first


def test_multi_partition_run_equals_single_partition_runs(db, rows, resources, instance):
    owner = rows.owner()
    videos = [str(rows.video(owner, n_scenes=3)) for _ in range(3)]
    materialize_videos([scene_clip_embeddings], videos, resources, instance)
    together = clip_rows(db)
    with db.transaction() as conn:
        conn.execute(text("TRUNCATE scene_clip_vectors"))
    for v in videos:
        materialize_videos([scene_clip_embeddings], [v], resources, instance)
    alone = clip_rows(db)
    assert len(together) == len(alone) == 9
    for a, b in zip(together, alone, strict=True):
        assert {k: v for k, v in a.items() if k not in ("embedding", "created_at")} == {
            k: v for k, v in b.items() if k not in ("embedding", "created_at")
        }
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)


def test_a_removed_scene_loses_its_vector(db, rows, resources, instance):
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    gone = clip_rows(db)[0]["scene_id"]
    with db.transaction() as conn:
        conn.execute(scenes.delete().where(scenes.c.id == gone))
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    assert gone not in {r["scene_id"] for r in clip_rows(db)}
    assert len(clip_rows(db)) == 2


def test_a_changed_thumbnail_is_re_embedded(db, rows, resources, instance, tmp_path):
    from heimdex_assets_tests.conftest import render_thumbnail

    video = rows.video(rows.owner(), n_scenes=2)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    before = {r["scene_id"]: r for r in clip_rows(db)}
    target = next(iter(before))
    new_thumb = tmp_path / "new.png"
    sha = render_thumbnail(new_thumb, 999)
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == target).values(thumbnail_uri=str(new_thumb), thumbnail_sha256=sha)
        )
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    after = {r["scene_id"]: r for r in clip_rows(db)}
    assert after[target]["input_sha256"] == sha != before[target]["input_sha256"]
    assert not np.allclose(after[target]["embedding"], before[target]["embedding"])
    other = next(k for k in before if k != target)
    assert after[other] == before[other]


@pytest.mark.parametrize("bad", ["corrupt", "missing"])
def test_a_bad_thumbnail_fails_only_its_scene(db, rows, resources, instance, tmp_path, bad):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=3)
    with db.engine.connect() as conn:
        victim = conn.execute(select(scenes.c.id).where(scenes.c.video_id == video).limit(1)).scalar_one()
    uri = tmp_path / "broken.png"
    if bad == "corrupt":
        uri.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == victim).values(thumbnail_uri=str(uri)))

    result = materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)

    assert {r["scene_id"] for r in clip_rows(db)} == set(_scene_ids(db, video)) - {victim}
    with db.engine.connect() as conn:
        failure = conn.execute(select(embedding_failures)).one()
    assert failure.item_id == str(victim) and failure.step == "scene_clip"
    expected = "not a readable image" if bad == "corrupt" else "file not found"
    assert expected in failure.reason
    meta = result.asset_materializations_for_node("scene_clip_embeddings")[0].metadata
    assert meta["failures"].value == 1 and meta["vectors_written"].value == 2

    # The same broken input fails again: one more attempt is counted, nothing else changes.
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    with db.engine.connect() as conn:
        assert conn.execute(select(embedding_failures.c.attempts)).scalar_one() == 2


def _scene_ids(db, video):
    with db.engine.connect() as conn:
        return conn.execute(select(scenes.c.id).where(scenes.c.video_id == video)).scalars().all()
