import hashlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text, update

from heimdex_assets.assets import scene_clip_embeddings
from heimdex_assets.db.tables import embedding_failures, partition_ledger, scene_clip_vectors, scenes
from heimdex_assets.models import record_models
from heimdex_assets.resources import BlobStore, ClipEmbedder
from heimdex_assets.runs import RETRY_FAILED_TAG
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import materialize_videos, render_thumbnail

BROKEN_PNG = b"\x89PNG\r\n\x1a\n this is not really a png"


@pytest.fixture(scope="module")
def other_clip(tmp_path_factory) -> ClipEmbedder:
    """A second tiny checkpoint (another seed, so other weights and another model id)."""
    import open_clip
    import torch

    from heimdex_assets.resources.clip_embedder import CONFIG_DIR, TINY_MODEL

    path = tmp_path_factory.mktemp("other-clip") / "tiny-clip-other.pt"
    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(4321)
    torch.save({"state_dict": open_clip.create_model(TINY_MODEL).state_dict()}, path)
    return ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(path), device="cpu")


def metadata(result):
    return {k: v.value for k, v in result.asset_materializations_for_node("scene_clip_embeddings")[0].metadata.items()}


def failure_rows(db):
    with db.engine.connect() as conn:
        return {r.item_id: r for r in conn.execute(select(embedding_failures))}


def db_now(db):
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT now()")).scalar_one()


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
    declared = None  # a missing file declares nothing; a corrupt one declares its own (true) sha256
    if bad == "corrupt":
        uri.write_bytes(BROKEN_PNG)
        declared = hashlib.sha256(BROKEN_PNG).hexdigest()
    with db.transaction() as conn:
        conn.execute(
            update(scenes).where(scenes.c.id == victim).values(thumbnail_uri=str(uri), thumbnail_sha256=declared)
        )

    result = materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)

    assert {r["scene_id"] for r in clip_rows(db)} == set(_scene_ids(db, video)) - {victim}
    with db.engine.connect() as conn:
        failure = conn.execute(select(embedding_failures)).one()
    assert failure.item_id == str(victim) and failure.step == "scene_clip"
    expected = "not a readable image" if bad == "corrupt" else "file not found"
    assert expected in failure.reason
    meta = metadata(result)
    assert meta["failures"] == 1 and meta["rows_written"] == 2
    assert meta["failure_reasons"] == {str(victim): failure.reason}

    # The same broken input is not retried before its backoff: it waits, its attempts stay.
    again = metadata(materialize_videos([scene_clip_embeddings], [str(video)], resources, instance))
    assert (again["items_waiting_for_retry"], again["items_computed"]) == (1, 0)
    with db.engine.connect() as conn:
        assert conn.execute(select(embedding_failures.c.attempts)).scalar_one() == 1


def test_failures_count_attempts_per_input_back_off_and_clear_once_fixed(db, rows, resources, instance, tmp_path):
    """Attempts count per item on the same input and restart when the input changes; a failed item
    waits for its backoff unless the run asks for failed items; a fixed thumbnail clears its failure."""
    owner = rows.owner()
    video = rows.video(owner, n_scenes=3)
    key = str(video)
    a, b, ok = sorted(_scene_ids(db, video))
    a_uri, b_uri = tmp_path / "a.png", tmp_path / "b.png"
    a_uri.write_bytes(BROKEN_PNG)
    b_uri.write_bytes(BROKEN_PNG)
    with db.transaction() as conn:  # undeclared: the identity is the URI's
        for scene, uri in ((a, a_uri), (b, b_uri)):
            conn.execute(
                update(scenes).where(scenes.c.id == scene).values(thumbnail_uri=str(uri), thumbnail_sha256=None)
            )

    first = metadata(materialize_videos([scene_clip_embeddings], [key], resources, instance))
    assert (first["items_computed"], first["failures"], first["rows_written"]) == (3, 2, 1)
    failed = failure_rows(db)
    assert set(failed) == {str(a), str(b)}
    for scene, uri in ((a, a_uri), (b, b_uri)):
        f = failed[str(scene)]
        assert f.attempts == 1 and f.partition_id == video and f.video_id == video
        assert f.model_id == resources["clip"].model_id and f.step_version == SPEC.step("scene_clip").version
        assert f.input_sha256 == hashlib.sha256(f"uri:{uri}".encode()).hexdigest()
        assert f.retry_at > db_now(db) and f.retry_at - f.failed_at == timedelta(hours=1)
    with db.engine.connect() as conn:
        ledger = conn.execute(select(partition_ledger).where(partition_ledger.c.step == "scene_clip")).one()
    assert (ledger.items, ledger.failed, ledger.retry_at) == (3, 2, min(f.retry_at for f in failed.values()))

    # A plain run leaves failed items to their backoff: not retried, attempts unchanged.
    waited = metadata(materialize_videos([scene_clip_embeddings], [key], resources, instance))
    assert (waited["items_waiting_for_retry"], waited["items_computed"], waited["items_unchanged"]) == (2, 0, 1)
    assert {k: (f.attempts, f.retry_at) for k, f in failure_rows(db).items()} == {
        k: (f.attempts, f.retry_at) for k, f in failed.items()
    }

    # Asked to retry failed items, the run does: one more attempt each, the backoff doubles.
    retried = metadata(
        materialize_videos([scene_clip_embeddings], [key], resources, instance, tags={RETRY_FAILED_TAG: "true"})
    )
    assert (retried["items_computed"], retried["failures"], retried["items_waiting_for_retry"]) == (2, 2, 0)
    failed = failure_rows(db)
    assert {k: f.attempts for k, f in failed.items()} == {str(a): 2, str(b): 2}
    assert all(f.retry_at - f.failed_at == timedelta(hours=2) for f in failed.values())

    # b's thumbnail changes to another unreadable one: a new input, computed at once, attempts restart.
    b2 = tmp_path / "b2.png"
    b2.write_bytes(BROKEN_PNG + b"!")
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == b).values(thumbnail_uri=str(b2)))
    changed = metadata(materialize_videos([scene_clip_embeddings], [key], resources, instance))
    assert (changed["items_computed"], changed["items_waiting_for_retry"]) == (1, 1)
    assert {k: f.attempts for k, f in failure_rows(db).items()} == {str(a): 2, str(b): 1}

    # a's file is fixed where it is (same input identity) and b gets a good thumbnail: b is done at
    # once, a when failed items are retried; then no failure is left.
    render_thumbnail(a_uri, 7)
    good = tmp_path / "good.png"
    good_sha = render_thumbnail(good, 8)
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == b).values(thumbnail_uri=str(good), thumbnail_sha256=good_sha))
    materialize_videos([scene_clip_embeddings], [key], resources, instance)
    assert {r["scene_id"] for r in clip_rows(db)} == {ok, b}
    assert set(failure_rows(db)) == {str(a)} and failure_rows(db)[str(a)].attempts == 2
    fixed = metadata(
        materialize_videos([scene_clip_embeddings], [key], resources, instance, tags={RETRY_FAILED_TAG: "true"})
    )
    assert (fixed["items_computed"], fixed["failures"], fixed["rows_written"]) == (1, 0, 1)
    assert {r["scene_id"] for r in clip_rows(db)} == {a, b, ok}
    assert failure_rows(db) == {}
    with db.engine.connect() as conn:
        assert conn.execute(select(partition_ledger.c.failed, partition_ledger.c.retry_at)).one() == (0, None)


def test_a_scene_without_a_thumbnail_has_no_row_and_no_failure(db, rows, resources, instance):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    with_thumb = rows.scene(video, owner, 0)
    rows.scene(video, owner, 1, thumbnail_uri=None, thumbnail_sha256=None)
    rows.scene(video, owner, 2, thumbnail_uri="  ", thumbnail_sha256=None)
    meta = metadata(materialize_videos([scene_clip_embeddings], [str(video)], resources, instance))
    assert [r["scene_id"] for r in clip_rows(db)] == [with_thumb]
    assert failure_rows(db) == {}
    assert (meta["items"], meta["failures"], meta["rows_written"]) == (1, 0, 1)


def test_a_thumbnail_whose_bytes_do_not_match_the_declared_sha256_fails(db, rows, resources, instance):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    good = rows.scene(video, owner, 0)
    liar = rows.scene(video, owner, 1, thumbnail_sha256="ab" * 32)
    with db.engine.connect() as conn:
        uri = conn.execute(select(scenes.c.thumbnail_uri).where(scenes.c.id == liar)).scalar_one()
    actual = hashlib.sha256(Path(uri).read_bytes()).hexdigest()

    meta = metadata(materialize_videos([scene_clip_embeddings], [str(video)], resources, instance))

    assert [r["scene_id"] for r in clip_rows(db)] == [good]
    failure = failure_rows(db)[str(liar)]
    assert f"bytes at {uri} have sha256 {actual[:12]}" in failure.reason
    assert f"not the declared {'ab' * 6}" in failure.reason
    assert failure.input_sha256 == "ab" * 32
    assert meta["failures"] == 1


def test_a_thumbnail_outside_the_allowed_roots_fails_only_its_scene(db, rows, resources, instance, tmp_path):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=0)
    kept = [rows.scene(video, owner, 0), rows.scene(video, owner, 2)]
    outside = tmp_path / "elsewhere" / "private.png"
    refused = rows.scene(video, owner, 1, thumbnail_uri=str(outside), thumbnail_sha256=render_thumbnail(outside, 7))
    confined = resources | {"blobs": BlobStore(allowed_roots=[str(rows.media)])}

    meta = metadata(materialize_videos([scene_clip_embeddings], [str(video)], confined, instance))

    assert {r["scene_id"] for r in clip_rows(db)} == set(kept)
    failure = failure_rows(db)[str(refused)]
    assert (failure.step, failure.reason) == ("scene_clip", f"{outside} is outside the allowed roots")
    assert (meta["failures"], meta["rows_written"]) == (1, 2)


def test_two_models_never_overwrite_each_others_rows(db, rows, resources, instance, clip, other_clip):
    assert other_clip.model_id != clip.model_id
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)
    first = clip_rows(db)
    with db.transaction() as conn:  # the deployment moves to the other checkpoint
        record_models(conn, {"scene_clip": other_clip.model_id}, "test")

    result = materialize_videos([scene_clip_embeddings], [str(video)], resources | {"clip": other_clip}, instance)

    assert metadata(result)["model_id"] == other_clip.model_id
    by_model = {}
    for r in clip_rows(db):
        by_model.setdefault(r["model_id"], []).append(r)
    assert set(by_model) == {clip.model_id, other_clip.model_id}
    assert by_model[clip.model_id] == first  # untouched, created_at included
    second = by_model[other_clip.model_id]
    assert [r["scene_id"] for r in second] == [r["scene_id"] for r in first]
    for old, new in zip(first, second, strict=True):
        assert new["input_sha256"] == old["input_sha256"]
        assert not np.allclose(new["embedding"], old["embedding"])
        np.testing.assert_allclose(new["embedding"], other_clip.embed_images(_image(db, new["scene_id"]))[0], atol=1e-5)


def test_a_worker_with_another_model_than_the_deployments_refuses_and_writes_nothing(
    db, rows, resources, instance, clip, other_clip
):
    video = rows.video(rows.owner(), n_scenes=3)
    materialize_videos([scene_clip_embeddings], [str(video)], resources, instance)  # records clip's model
    before = clip_rows(db)
    with db.engine.connect() as conn:
        ledger = conn.execute(select(partition_ledger)).all()
    other = resources | {"clip": other_clip}

    result = materialize_videos(
        [scene_clip_embeddings], [str(video)], other, instance, tags={"heimdex/force": "true"}, raise_on_error=False
    )

    assert result.success is False
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert other_clip.model_id in message and clip.model_id in message
    assert f"configured for {other_clip.model_id}, but the deployment expects {clip.model_id}" in message
    assert clip_rows(db) == before
    assert failure_rows(db) == {}
    with db.engine.connect() as conn:
        assert conn.execute(select(partition_ledger)).all() == ledger


def _image(db, scene_id):
    from PIL import Image

    with db.engine.connect() as conn:
        uri = conn.execute(select(scenes.c.thumbnail_uri).where(scenes.c.id == scene_id)).scalar_one()
    return [Image.open(uri).convert("RGB")]


def _scene_ids(db, video):
    with db.engine.connect() as conn:
        return conn.execute(select(scenes.c.id).where(scenes.c.video_id == video)).scalars().all()
