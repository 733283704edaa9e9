import hashlib
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import insert, select, update

from heimdex_assets.assets.person_photo import person_photo_embeddings
from heimdex_assets.db.tables import embedding_failures, person_photo_vectors, person_reference_photos, persons
from heimdex_assets.demo import build_corpus, load_corpus
from heimdex_assets.freshness import partition_states
from heimdex_assets.models import expected_models, person_identity
from heimdex_assets.resources import SearchIndex
from heimdex_assets.resources.person_detector import crop
from heimdex_assets.runs import RETRY_FAILED_TAG
from heimdex_assets.spec import SPEC
from heimdex_assets.steps import PERSON_PHOTO

STEP = SPEC.step("person_photo")


def load_demo(db, media):
    """Two demo owners, each with the persons "astronaut" and "cameraman" and their real photos."""
    built = build_corpus(media, owners=2, videos_per_owner=1, scenes_per_video=2, processing_videos=0)
    with db.transaction() as conn:
        load_corpus(conn, built)
    return built


@pytest.fixture
def corpus(db, tmp_path):
    return load_demo(db, tmp_path / "media")


def materialize_owner(assets, owner_id, resources, instance, person_detector, raise_on_error=True, tags=None):
    """Materialise ``assets`` for one ``owners`` partition, adding the partition first."""
    key = str(owner_id)
    if key not in instance.get_dynamic_partitions("owners"):
        instance.add_dynamic_partitions("owners", [key])
    return dg.materialize(
        assets,
        partition_key=key,
        resources=resources | {"person_detector": person_detector},
        instance=instance,
        raise_on_error=raise_on_error,
        tags=tags,
    )


def owner_state(db, step, resources, person_detector, owner_id, tmp_path):
    """The freshness of one owner's partition for ``step``, under the models the deployment expects."""
    everything = resources | {
        "person_detector": person_detector,
        "search_index": SearchIndex(sqlite_path=str(tmp_path / "search" / "scenes.sqlite")),
    }
    with db.engine.connect() as conn:
        return partition_states(conn, step, expected_models(conn, everything), partition_ids=[owner_id])[str(owner_id)]


def failure_rows(db):
    with db.engine.connect() as conn:
        return {r.item_id: r for r in conn.execute(select(embedding_failures))}


def metadata(result, asset_key):
    return {k: v.value for k, v in result.asset_materializations_for_node(asset_key)[0].metadata.items()}


def table_rows(db, table, order_by, **where):
    q = select(table).order_by(*(table.c[c] for c in order_by))
    for col, value in where.items():
        q = q.where(table.c[col] == value)
    with db.engine.connect() as conn:
        return [r._asdict() for r in conn.execute(q)]


def photo_rows(db, **where):
    return {r["id"]: r for r in table_rows(db, person_reference_photos, ["id"], **where)}


def vector_rows(db, **where):
    return {r["photo_id"]: r for r in table_rows(db, person_photo_vectors, ["photo_id", "step_version"], **where)}


def sha256_of(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def render_no_person(path: Path | str, seed: int) -> str:
    """A rendered 320x240 PNG of coloured shapes (nobody in it); returns its sha256."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (320, 240), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, 260, 2))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([x, y % 200, x + 50, y % 200 + 30], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_photo(db, person_id, owner_id, uri) -> uuid.UUID:
    """A new PENDING reference photo, written the way the product writes it."""
    photo_id = uuid.uuid4()
    with db.transaction() as conn:
        conn.execute(
            insert(person_reference_photos).values(
                id=photo_id, person_id=person_id, owner_id=owner_id, uri=str(uri), status="PENDING"
            )
        )
    return photo_id


def add_person(db, owner_id, name) -> uuid.UUID:
    person_id = uuid.uuid4()
    with db.transaction() as conn:
        conn.execute(insert(persons).values(id=person_id, owner_id=owner_id, name=name))
    return person_id


def expected_vector(clip, person_detector, uri):
    """What the asset should store for a photo, computed here: CLIP of the largest detection's crop."""
    image = Image.open(uri).convert("RGB")
    largest = max(person_detector.detect(image), key=lambda d: (d.w * d.h, d.score))
    return clip.embed_images([crop(image, largest)])[0]


def test_reference_photos_become_ready_with_the_clip_vector_of_their_person(
    db, corpus, resources, instance, clip, person_detector
):
    owner, other = corpus.owners
    assert {r["status"] for r in photo_rows(db).values()} == {"PENDING"}

    result = materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)

    photos = photo_rows(db)
    vectors = vector_rows(db)
    demo_photos = [ph for person in owner.persons for ph in person.photos]
    # Both demo people (a frontal portrait and a man in profile) are found in every reference photo.
    assert {photos[ph.id]["status"] for ph in demo_photos} == {"READY"}
    for ph in demo_photos:
        assert photos[ph.id]["failure_reason"] is None
        row = vectors[ph.id]
        assert row["input_sha256"] == hashlib.sha256(Path(ph.uri).read_bytes()).hexdigest() == ph.sha256
        assert (row["person_id"], row["owner_id"], row["step_version"]) == (ph.person_id, owner.id, STEP.version)
        # The model identity is CLIP and the detector's settings together: both shape the vector.
        assert row["model_id"] == person_identity(clip, person_detector)
        assert row["model_id"].startswith(clip.model_id + "+")
        assert row["dimension"] == clip.dimension == len(row["embedding"])
        np.testing.assert_allclose(row["embedding"], expected_vector(clip, person_detector, ph.uri), atol=1e-5)

    meta = metadata(result, "person_photo_embeddings")
    assert (meta["partitions"], meta["items"], meta["items_computed"]) == (1, len(demo_photos), len(demo_photos))
    assert (meta["rows_written"], meta["failures"]) == (len(vectors), 0)
    assert (meta["step_version"], meta["model_id"]) == (STEP.version, person_identity(clip, person_detector))
    # The other owner was not part of the run.
    assert {photos[ph.id]["status"] for p in other.persons for ph in p.photos} == {"PENDING"}
    assert {r["owner_id"] for r in vectors.values()} == {owner.id}


def test_bad_photos_fail_with_a_readable_reason_and_do_not_sink_the_others(
    db, corpus, resources, instance, clip, person_detector, tmp_path
):
    owner = corpus.owners[0]
    astronaut = next(p for p in owner.persons if p.key == "astronaut")
    corrupt, missing, nobody = tmp_path / "corrupt.png", tmp_path / "missing.png", tmp_path / "nobody.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    render_no_person(nobody, 7)
    assert person_detector.detect(Image.open(nobody).convert("RGB")) == []  # the premise: nobody in it
    bad = {add_photo(db, astronaut.id, owner.id, uri): uri for uri in (corrupt, missing, nobody)}
    by_uri = {uri: photo_id for photo_id, uri in bad.items()}

    result = materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)

    photos, vectors = photo_rows(db), vector_rows(db)
    reasons = {
        corrupt: f"unreadable image: not a readable image: {corrupt} (UnidentifiedImageError)",
        missing: f"unreadable image: file not found: {missing}",
        nobody: "no person found in photo",
    }
    for uri, reason in reasons.items():
        photo = photos[by_uri[uri]]
        assert (photo["status"], photo["failure_reason"]) == ("FAILED", reason)
        assert by_uri[uri] not in vectors
    assert all(photos[ph.id]["status"] == "READY" and ph.id in vectors for ph in astronaut.photos)
    failures = failure_rows(db)
    assert {uuid.UUID(k) for k in failures} == set(bad)
    model_id = person_identity(clip, person_detector)
    for photo_id, uri in bad.items():
        f = failures[str(photo_id)]
        assert (f.step, f.step_version, f.model_id) == ("person_photo", STEP.version, model_id)
        assert (f.owner_id, f.partition_id, f.video_id) == (owner.id, owner.id, None)
        assert (f.reason, f.attempts) == (reasons[uri], 1)
        assert f.retry_at - f.failed_at == timedelta(hours=1)  # the first backoff
        # No sha256 declared: the photo's identity is its URI (a new URI is a new input).
        assert f.input_sha256 == hashlib.sha256(f"uri:{uri}".encode()).hexdigest()
    meta = metadata(result, "person_photo_embeddings")
    assert {k: meta["failure_reasons"][str(v)] for k, v in by_uri.items()} == reasons
    assert meta["failures"] == 3

    # The same broken inputs are not tried again while their backoff lasts...
    waited = materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)
    meta = metadata(waited, "person_photo_embeddings")
    assert (meta["items_waiting_for_retry"], meta["items_computed"], meta["failures"]) == (3, 0, 0)
    assert failure_rows(db) == failures and photo_rows(db) == photos
    # ...unless the run asks for it: they fail again, one more attempt each, the backoff doubled.
    materialize_owner(
        [person_photo_embeddings], owner.id, resources, instance, person_detector, tags={RETRY_FAILED_TAG: "true"}
    )
    again = failure_rows(db)
    assert {again[str(p)].attempts for p in bad} == {2}
    assert {again[str(p)].retry_at - again[str(p)].failed_at for p in bad} == {timedelta(hours=2)}
    assert photo_rows(db) == photos

    # Repaired: the corrupt file becomes a portrait and its sha256 is declared (a new input, so it is
    # done at once, backoff or not): READY, its failure forgotten. A READY photo replaced by one that
    # shows nobody turns FAILED and loses its vector at this version.
    shutil.copyfile(astronaut.photos[0].uri, corrupt)
    repaired = by_uri[corrupt]
    turned = astronaut.photos[1]
    t = person_reference_photos
    with db.transaction() as conn:
        conn.execute(update(t).where(t.c.id == repaired).values(sha256=astronaut.photos[0].sha256))
        conn.execute(update(t).where(t.c.id == turned.id).values(uri=str(nobody), sha256=sha256_of(nobody)))
    materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)
    photos, vectors = photo_rows(db), vector_rows(db)
    assert (photos[repaired]["status"], photos[repaired]["failure_reason"]) == ("READY", None)
    assert vectors[repaired]["input_sha256"] == astronaut.photos[0].sha256
    np.testing.assert_allclose(vectors[repaired]["embedding"], vectors[astronaut.photos[0].id]["embedding"], atol=1e-6)
    assert (photos[turned.id]["status"], photos[turned.id]["failure_reason"]) == ("FAILED", "no person found in photo")
    assert turned.id not in vectors
    failed_now = failure_rows(db)
    assert str(repaired) not in failed_now and str(turned.id) in failed_now
    assert failed_now[str(turned.id)].input_sha256 == sha256_of(nobody)
    # The two still broken wait for their backoff, as they were.
    assert {failed_now[str(by_uri[u])] for u in (missing, nobody)} == {again[str(by_uri[u])] for u in (missing, nobody)}


def test_second_run_changes_nothing(db, corpus, resources, instance, person_detector, tmp_path):
    owner = corpus.owners[0]
    render_no_person(tmp_path / "nobody.png", 3)
    add_photo(db, owner.persons[0].id, owner.id, tmp_path / "nobody.png")
    materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)
    photos, vectors = photo_rows(db), vector_rows(db)

    result = materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)

    assert photo_rows(db) == photos  # updated_at included: an unchanged status is not rewritten
    assert vector_rows(db) == vectors  # created_at included
    meta = metadata(result, "person_photo_embeddings")
    assert meta["items_computed"] == 0 and meta["items_unchanged"] == len(vectors) > 0
    assert (meta["items_waiting_for_retry"], meta["rows_written"], meta["items"]) == (1, 0, len(vectors) + 1)


def test_a_deleted_photo_loses_its_vector_and_the_rest_stay(db, corpus, resources, instance, person_detector):
    owner = corpus.owners[0]
    materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)
    before = vector_rows(db)
    gone = next(iter(before))
    with db.transaction() as conn:
        conn.execute(person_reference_photos.delete().where(person_reference_photos.c.id == gone))

    materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)

    assert vector_rows(db) == {k: v for k, v in before.items() if k != gone}


def test_a_photo_moved_to_another_owner_leaves_this_owners_rows(db, corpus, resources, instance, person_detector):
    first, second = corpus.owners
    materialize_owner([person_photo_embeddings], first.id, resources, instance, person_detector)
    moved = next(iter(vector_rows(db)))
    target = second.persons[0].id
    with db.transaction() as conn:
        conn.execute(
            update(person_reference_photos)
            .where(person_reference_photos.c.id == moved)
            .values(owner_id=second.id, person_id=target)
        )

    materialize_owner([person_photo_embeddings], first.id, resources, instance, person_detector)

    assert moved not in vector_rows(db)  # not the first owner's photo any more
    assert {r["owner_id"] for r in vector_rows(db).values()} == {first.id}


def test_unknown_and_malformed_owner_keys_fail_after_the_good_owner_is_written(
    db, corpus, resources, instance, person_detector
):
    owner = corpus.owners[0]
    unknown = str(uuid.uuid4())
    instance.add_dynamic_partitions("owners", [str(owner.id), unknown])
    result = dg.materialize(
        [person_photo_embeddings],
        resources=resources | {"person_detector": person_detector},
        instance=instance,
        tags={"dagster/asset_partition_range_start": str(owner.id), "dagster/asset_partition_range_end": unknown},
        raise_on_error=False,
    )

    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.error.message
    assert f"1 partition(s) could not be processed: {unknown}: unknown owner {unknown}" in message
    assert {r["owner_id"] for r in vector_rows(db).values()} == {owner.id}  # the good owner was written

    malformed = materialize_owner(
        [person_photo_embeddings], "Not-A-UUID", resources, instance, person_detector, raise_on_error=False
    )
    (failure,) = [e for e in malformed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "malformed owner id 'Not-A-UUID'" in failure.step_failure_data.error.message


def test_an_unreadable_declared_photo_is_failed_not_stale_and_waits_for_its_backoff(
    db, corpus, resources, instance, person_detector, tmp_path
):
    owner = corpus.owners[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this upload was a text file")
    photo_id = add_photo(db, owner.persons[0].id, owner.id, broken)
    with db.transaction() as conn:  # the upload declared the sha256 of what it stored
        conn.execute(
            update(person_reference_photos)
            .where(person_reference_photos.c.id == photo_id)
            .values(sha256=sha256_of(broken))
        )
    assert owner_state(db, PERSON_PHOTO, resources, person_detector, owner.id, tmp_path).state == "missing"

    materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)

    reason = f"unreadable image: not a readable image: {broken} (UnidentifiedImageError)"
    photo = photo_rows(db)[photo_id]
    assert (photo["status"], photo["failure_reason"]) == ("FAILED", reason)
    state = owner_state(db, PERSON_PHOTO, resources, person_detector, owner.id, tmp_path)
    assert (state.state, state.failed_items, state.stale_items) == ("failed", 1, 0)
    (failure,) = failure_rows(db).values()
    assert (failure.item_id, failure.input_sha256, failure.attempts) == (str(photo_id), sha256_of(broken), 1)
    assert state.retry_at == failure.retry_at

    # A second run without tags does not try it again: it waits for its backoff, untouched.
    result = materialize_owner([person_photo_embeddings], owner.id, resources, instance, person_detector)

    meta = metadata(result, "person_photo_embeddings")
    assert (meta["items_waiting_for_retry"], meta["items_computed"], meta["failures"]) == (1, 0, 0)
    assert list(failure_rows(db).values()) == [failure]
    assert photo_rows(db)[photo_id] == photo
    assert owner_state(db, PERSON_PHOTO, resources, person_detector, owner.id, tmp_path).state == "failed"
