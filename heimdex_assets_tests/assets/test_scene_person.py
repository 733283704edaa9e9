import hashlib
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterExecutionStepExecutionError, Failure
from PIL import Image
from sqlalchemy import select, update

from heimdex_assets.assets.scene_person import scene_person_embeddings
from heimdex_assets.db.tables import embedding_failures, scene_person_scans, scene_person_vectors, scenes
from heimdex_assets.demo import build_corpus, load_corpus
from heimdex_assets.models import person_identity, record_models
from heimdex_assets.resources.person_detector import OpenCvPersonDetector
from heimdex_assets.runs import FORCE_TAG, OWNER_SCOPE_TAG
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.resources.test_person_detector import two_people

STEP = SPEC.step("scene_person")
ASSETS = [scene_person_embeddings]


@pytest.fixture
def corpus(db, tmp_path):
    """Two owners with one video each: every second scene shows the astronaut or the cameraman."""
    built = build_corpus(
        tmp_path / "media", owners=2, videos_per_owner=1, scenes_per_video=10, processing_videos=0, real_photo_every=2
    )
    with db.transaction() as conn:
        load_corpus(conn, built)
    return built


@pytest.fixture
def person_resources(resources, person_detector):
    return resources | {"person_detector": person_detector}


def table_rows(db, table, video_id=None):
    q = select(table).order_by(*table.primary_key)
    if video_id is not None:
        q = q.where(table.c.video_id == video_id)
    with db.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(q)]


def metadata(result):
    materialization = result.asset_materializations_for_node("scene_person_embeddings")[0]
    return {k: v.value for k, v in materialization.metadata.items()}


def without_created_at(row):
    return {k: v for k, v in row.items() if k != "created_at"}


def test_materialising_writes_a_vector_per_person_and_a_scan_per_scene(
    db, corpus, person_resources, instance, clip, person_detector
):
    model_id = f"{clip.model_id}+{person_detector.identity}"  # CLIP over the crops of this detector
    video = corpus.owners[0].videos[0]
    result = materialize_videos(ASSETS, [str(video.id)], person_resources, instance)

    vectors, scans = table_rows(db, scene_person_vectors), table_rows(db, scene_person_scans)
    by_id = {s.id: s for s in video.scenes}
    assert {r["scene_id"] for r in scans} == set(by_id)  # every scene scanned, with or without people
    assert {r["scene_id"] for r in vectors} == {s.id for s in video.scenes if s.shows_person}
    for scan in scans:
        scene = by_id[scan["scene_id"]]
        mine = [r for r in vectors if r["scene_id"] == scene.id]
        assert scan["detections"] == len(mine) == (1 if scene.shows_person else 0)
        assert scan["input_sha256"] == hashlib.sha256(Path(scene.thumbnail_uri).read_bytes()).hexdigest()
        assert (scan["step_version"], scan["model_id"]) == (STEP.version, model_id)
        assert (scan["owner_id"], scan["video_id"]) == (video.owner_id, video.id)
    for r in vectors:
        scene = by_id[r["scene_id"]]
        width, height = Image.open(scene.thumbnail_uri).size
        assert r["detection_index"] == 0
        assert r["box_x"] >= 0 and r["box_y"] >= 0 and r["box_w"] > 0 and r["box_h"] > 0
        assert r["box_x"] + r["box_w"] <= width and r["box_y"] + r["box_h"] <= height
        assert 0.5 < r["score"] < 1 and r["detector"].startswith("opencv-haar/")
        assert (r["step_version"], r["model_id"]) == (STEP.version, model_id)
        assert r["input_sha256"] == hashlib.sha256(Path(scene.thumbnail_uri).read_bytes()).hexdigest()
        assert (r["owner_id"], r["video_id"]) == (video.owner_id, video.id)
        vector = np.asarray(r["embedding"])
        assert vector.shape == (clip.dimension,) == (r["dimension"],)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5

    meta = metadata(result)
    assert (meta["partitions"], meta["items"], meta["scenes_with_people"], meta["detections"]) == (1, 10, 5, 5)
    assert meta["rows_written"] == 10 + 5  # a scan per scene, a vector per person
    assert (meta["failures"], meta["step_version"], meta["model_id"]) == (0, STEP.version, model_id)
    assert meta["detector"].startswith("opencv-")


def test_the_model_id_includes_the_detector_and_its_settings(db, corpus, person_resources, instance, clip):
    default, stricter = OpenCvPersonDetector(), OpenCvPersonDetector(min_face_neighbours=6)
    assert default.identity == OpenCvPersonDetector().identity  # the same settings, the same identity
    assert default.identity.startswith(f"{default.name}#")
    assert stricter.identity != default.identity
    assert person_identity(clip, stricter) != person_identity(clip, default)

    video = str(corpus.owners[0].videos[0].id)
    materialize_videos(ASSETS, [video], person_resources, instance)
    first = table_rows(db, scene_person_scans)
    assert {r["model_id"] for r in first} == {person_identity(clip, default)}
    # The deployment moves to the stricter detector: its rows come beside the first ones.
    with db.transaction() as conn:
        record_models(conn, {"scene_person": person_identity(clip, stricter)}, "test")
    result = materialize_videos(ASSETS, [video], person_resources | {"person_detector": stricter}, instance)
    assert metadata(result)["model_id"] == person_identity(clip, stricter)
    scans = table_rows(db, scene_person_scans)
    assert {r["model_id"] for r in scans} == {person_identity(clip, default), person_identity(clip, stricter)}
    assert [r for r in scans if r["model_id"] == person_identity(clip, default)] == first


def test_the_vector_is_the_clip_vector_of_the_crop(db, corpus, person_resources, instance, clip):
    video = corpus.owners[0].videos[0]
    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)
    row = table_rows(db, scene_person_vectors)[0]
    scene = next(s for s in video.scenes if s.id == row["scene_id"])
    image = Image.open(scene.thumbnail_uri).convert("RGB")
    box = (row["box_x"], row["box_y"], row["box_x"] + row["box_w"], row["box_y"] + row["box_h"])
    np.testing.assert_allclose(row["embedding"], clip.embed_images([image.crop(box)])[0], atol=1e-5)


def test_re_runs_leave_identical_rows_forced_or_not(db, corpus, person_resources, instance):
    video = str(corpus.owners[0].videos[0].id)
    materialize_videos(ASSETS, [video], person_resources, instance)
    first = (table_rows(db, scene_person_vectors), table_rows(db, scene_person_scans))

    again = materialize_videos(ASSETS, [video], person_resources, instance)
    assert (table_rows(db, scene_person_vectors), table_rows(db, scene_person_scans)) == first
    assert metadata(again)["items_unchanged"] == 10 and metadata(again)["detections"] == 0

    # Forced, every thumbnail is scanned again and its rows rewritten whole: the same rows, newly written.
    forced = materialize_videos(ASSETS, [video], person_resources, instance, tags={FORCE_TAG: "true"})
    rewritten = (table_rows(db, scene_person_vectors), table_rows(db, scene_person_scans))
    assert [[without_created_at(r) for r in t] for t in rewritten] == [
        [without_created_at(r) for r in t] for t in first
    ]
    assert metadata(forced)["items_unchanged"] == 0 and metadata(forced)["detections"] == 5


def test_a_scene_with_two_people_gets_a_row_per_person_best_first(db, corpus, person_resources, instance, tmp_path):
    video = corpus.owners[0].videos[0]
    scene = next(s for s in video.scenes if not s.shows_person)
    thumb = tmp_path / "two.png"
    two_people(video.scenes).save(thumb)
    sha = hashlib.sha256(thumb.read_bytes()).hexdigest()
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == scene.id).values(thumbnail_uri=str(thumb), thumbnail_sha256=sha)
        )

    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)

    rows = [r for r in table_rows(db, scene_person_vectors) if r["scene_id"] == scene.id]
    assert [r["detection_index"] for r in rows] == [0, 1]
    assert rows[0]["score"] > rows[1]["score"]
    assert rows[0]["box_x"] + rows[0]["box_w"] <= 640 <= rows[1]["box_x"]  # astronaut left, cameraman right
    assert not np.allclose(rows[0]["embedding"], rows[1]["embedding"])
    scan = next(r for r in table_rows(db, scene_person_scans) if r["scene_id"] == scene.id)
    assert scan["detections"] == 2


def test_a_changed_thumbnail_replaces_its_detections(db, corpus, person_resources, instance, tmp_path):
    video = corpus.owners[0].videos[0]
    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)
    before = {r["scene_id"]: r for r in table_rows(db, scene_person_vectors)}
    person = next(s for s in video.scenes if s.shows_person)
    nobody = next(s for s in video.scenes if not s.shows_person)
    # The person's scene now shows a picture without anyone in it.
    new_thumb = tmp_path / "recut.png"
    shutil.copy(nobody.thumbnail_uri, new_thumb)
    sha = hashlib.sha256(new_thumb.read_bytes()).hexdigest()
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == person.id).values(thumbnail_uri=str(new_thumb), thumbnail_sha256=sha)
        )

    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)

    after = {r["scene_id"]: r for r in table_rows(db, scene_person_vectors)}
    assert person.id not in after
    assert after == {k: v for k, v in before.items() if k != person.id}
    scan = next(r for r in table_rows(db, scene_person_scans) if r["scene_id"] == person.id)
    assert (scan["detections"], scan["input_sha256"]) == (0, sha)


def test_a_removed_scene_loses_its_rows(db, corpus, person_resources, instance):
    video = corpus.owners[0].videos[0]
    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)
    gone = next(s for s in video.scenes if s.shows_person)
    with db.transaction() as conn:
        conn.execute(scenes.delete().where(scenes.c.id == gone.id))
    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)
    assert gone.id not in {r["scene_id"] for r in table_rows(db, scene_person_vectors)}
    assert len(table_rows(db, scene_person_scans)) == 9 and len(table_rows(db, scene_person_vectors)) == 4


@pytest.mark.parametrize("bad", ["corrupt", "missing"])
def test_a_bad_thumbnail_fails_only_its_scene(db, corpus, person_resources, instance, tmp_path, bad):
    video = corpus.owners[0].videos[0]
    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)
    victim = next(s for s in video.scenes if s.shows_person)
    broken = tmp_path / "broken.png"
    declared = None  # a missing file declares nothing; a corrupt one declares its own (true) sha256
    if bad == "corrupt":
        broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        declared = hashlib.sha256(broken.read_bytes()).hexdigest()
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == victim.id).values(thumbnail_uri=str(broken), thumbnail_sha256=declared)
        )

    result = materialize_videos(ASSETS, [str(video.id)], person_resources, instance)

    others = {s.id for s in video.scenes} - {victim.id}
    assert {r["scene_id"] for r in table_rows(db, scene_person_scans)} == others
    assert {r["scene_id"] for r in table_rows(db, scene_person_vectors)} == {
        s.id for s in video.scenes if s.shows_person and s.id != victim.id
    }
    with db.engine.connect() as conn:
        failure = conn.execute(select(embedding_failures)).one()
    assert (failure.item_id, failure.step, failure.step_version) == (str(victim.id), "scene_person", STEP.version)
    assert ("not a readable image" if bad == "corrupt" else "file not found") in failure.reason
    meta = metadata(result)
    # Only the changed scene was computed: it failed, and the other nine were left as they were.
    assert (meta["failures"], meta["items_computed"], meta["items_unchanged"]) == (1, 1, 9)
    assert (meta["scenes_with_people"], meta["detections"]) == (0, 0)
    assert meta["failure_reasons"] == {str(victim.id): failure.reason}

    # Once the thumbnail is readable again, the scene is scanned and its failure forgotten.
    with db.transaction() as conn:
        conn.execute(
            update(scenes)
            .where(scenes.c.id == victim.id)
            .values(thumbnail_uri=victim.thumbnail_uri, thumbnail_sha256=victim.thumbnail_sha256)
        )
    materialize_videos(ASSETS, [str(video.id)], person_resources, instance)
    assert victim.id in {r["scene_id"] for r in table_rows(db, scene_person_vectors)}
    with db.engine.connect() as conn:
        assert conn.execute(select(embedding_failures)).all() == []


def test_owner_isolation_other_owners_rows_stay_byte_identical(db, corpus, person_resources, instance):
    a, b = corpus.owners
    materialize_videos(ASSETS, [str(b.videos[0].id)], person_resources, instance)

    def b_state():
        with db.engine.connect() as conn:
            return [
                [tuple(r) for r in conn.execute(select(t).where(t.c.owner_id == b.id).order_by(*t.primary_key))]
                for t in (scene_person_vectors, scene_person_scans)
            ]

    before = b_state()
    assert before[0] and before[1]
    tags = {OWNER_SCOPE_TAG: str(a.id), FORCE_TAG: "true"}
    materialize_videos(ASSETS, [str(a.videos[0].id)], person_resources, instance, tags=tags)
    assert b_state() == before
    assert {r["owner_id"] for r in table_rows(db, scene_person_scans)} == {a.id, b.id}


def test_a_video_outside_the_runs_owner_scope_is_refused(db, corpus, person_resources, instance):
    a, b = corpus.owners
    mine, theirs = str(a.videos[0].id), str(b.videos[0].id)
    with pytest.raises((Failure, DagsterExecutionStepExecutionError)) as err:
        materialize_videos(ASSETS, [mine, theirs], person_resources, instance, tags={OWNER_SCOPE_TAG: str(a.id)})
    assert f"video {theirs} is not in the scope of owner {a.id}" in str(err.value)
    assert {r["video_id"] for r in table_rows(db, scene_person_scans)} == {uuid.UUID(mine)}  # in scope: done


def test_one_run_of_two_videos_equals_two_runs(db, corpus, person_resources, instance):
    keys = [str(v.id) for v in corpus.videos]
    materialize_videos(ASSETS, keys, person_resources, instance)
    together = (table_rows(db, scene_person_vectors), table_rows(db, scene_person_scans))
    with db.transaction() as conn:
        conn.execute(scene_person_vectors.delete())
        conn.execute(scene_person_scans.delete())
    for key in keys:
        materialize_videos(ASSETS, [key], person_resources, instance)
    alone = (table_rows(db, scene_person_vectors), table_rows(db, scene_person_scans))
    assert len(together[0]) == len(alone[0]) == 10 and len(together[1]) == len(alone[1]) == 20
    for x, y in zip([*together[0], *together[1]], [*alone[0], *alone[1]], strict=True):
        assert {k: v for k, v in x.items() if k not in ("embedding", "created_at")} == {
            k: v for k, v in y.items() if k not in ("embedding", "created_at")
        }
        if "embedding" in x:
            np.testing.assert_allclose(x["embedding"], y["embedding"], atol=1e-5)
