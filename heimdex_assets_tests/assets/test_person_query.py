import hashlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import insert, select, update

from heimdex_assets.assets.person_photo import person_photo_embeddings
from heimdex_assets.assets.person_query import person_query_embeddings
from heimdex_assets.db.tables import (
    embedding_failures,
    person_photo_vectors,
    person_query_vectors,
    person_reference_photos,
    persons,
)
from heimdex_assets.models import person_identity
from heimdex_assets.partitions import owners_partitions
from heimdex_assets.search import SearchError, person_query_vector
from heimdex_assets.spec import SPEC
from heimdex_assets.steps import PERSON_PHOTO, PERSON_QUERY
from heimdex_assets_tests.assets.test_person_photo import (
    add_person,
    add_photo,
    failure_rows,
    load_demo,
    materialize_owner,
    metadata,
    owner_state,
    photo_rows,
    render_no_person,
    sha256_of,
    table_rows,
    vector_rows,
)

BOTH = [person_photo_embeddings, person_query_embeddings]
STEP = SPEC.step("person_query")


@pytest.fixture
def corpus(db, tmp_path):
    return load_demo(db, tmp_path / "media")


def query_rows(db, **where):
    return {r["person_id"]: r for r in table_rows(db, person_query_vectors, ["person_id", "step_version"], **where)}


def expected_query(db, person_id):
    """The query vector, computed here: normalised mean of the person's READY photo vectors."""
    photos, vectors = person_reference_photos, person_photo_vectors
    with db.engine.connect() as conn:
        found = conn.execute(
            select(vectors.c.photo_id, vectors.c.input_sha256, vectors.c.embedding, vectors.c.model_id)
            .join(photos, photos.c.id == vectors.c.photo_id)
            .where(
                photos.c.person_id == person_id,
                photos.c.status == "READY",
                vectors.c.step_version == SPEC.step("person_photo").version,
            )
        ).all()
    if not found:
        return None
    mean = np.stack([np.asarray(r.embedding, dtype=np.float64) for r in found]).mean(axis=0)
    listed = "\n".join(sorted(f"{r.photo_id}:{r.input_sha256}" for r in found))
    return {
        "embedding": mean / np.linalg.norm(mean),
        "input_sha256": hashlib.sha256(listed.encode()).hexdigest(),
        "photo_count": len(found),
        "model_id": {r.model_id for r in found},
    }


def assert_query_matches_photos(db, person_id):
    row, expected = query_rows(db).get(person_id), expected_query(db, person_id)
    assert expected is not None and row is not None
    np.testing.assert_allclose(row["embedding"], expected["embedding"], atol=1e-6)
    assert abs(np.linalg.norm(row["embedding"]) - 1.0) < 1e-5
    assert (row["input_sha256"], row["photo_count"]) == (expected["input_sha256"], expected["photo_count"])
    assert {row["model_id"]} == expected["model_id"]
    assert (row["step_version"], row["dimension"]) == (STEP.version, len(row["embedding"]))
    return row


def mirrored(src, dst):
    """A new reference photo: the mirror image of ``src`` (the same person, other pixels)."""
    ImageOps.mirror(Image.open(src).convert("RGB")).save(dst)
    return dst


def test_query_vector_is_the_normalised_mean_of_ready_photo_vectors(
    db, corpus, resources, instance, person_detector, tmp_path
):
    owner = corpus.owners[0]
    nobody = add_person(db, owner.id, "Nobody In Particular")
    render_no_person(tmp_path / "nobody.png", 11)
    (tmp_path / "corrupt.png").write_bytes(b"GIF89a broken")
    add_photo(db, nobody, owner.id, tmp_path / "nobody.png")
    add_photo(db, nobody, owner.id, tmp_path / "corrupt.png")
    photoless = add_person(db, owner.id, "No Photos Yet")

    result = materialize_owner(BOTH, owner.id, resources, instance, person_detector)

    rows = query_rows(db)
    for person in owner.persons:  # the demo people: every photo READY, so all of them count
        assert assert_query_matches_photos(db, person.id)["photo_count"] == len(person.photos)
    assert nobody not in rows and photoless not in rows
    meta = metadata(result, "person_query_embeddings")
    # A person without a READY photo has nothing to average: no item, so no vector and no failure.
    assert meta["items"] == meta["rows_written"] == len(rows) == len(owner.persons)
    assert meta["failures"] == 0 and not {k for k in failure_rows(db) if k in (str(nobody), str(photoless))}
    assert (meta["step_version"], meta["photo_step_version"]) == (STEP.version, SPEC.step("person_photo").version)


def test_adding_or_removing_a_photo_changes_the_query_vector(
    db, corpus, resources, instance, person_detector, tmp_path
):
    owner = corpus.owners[0]
    astronaut = next(p for p in owner.persons if p.key == "astronaut")
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    before = assert_query_matches_photos(db, astronaut.id)

    added = add_photo(db, astronaut.id, owner.id, mirrored(astronaut.photos[0].uri, tmp_path / "mirrored.png"))
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    assert photo_rows(db)[added]["status"] == "READY"
    grown = assert_query_matches_photos(db, astronaut.id)
    assert grown["photo_count"] == before["photo_count"] + 1
    assert grown["input_sha256"] != before["input_sha256"]
    assert not np.allclose(grown["embedding"], before["embedding"], atol=1e-4)

    with db.transaction() as conn:
        gone = astronaut.photos[0].id
        conn.execute(person_reference_photos.delete().where(person_reference_photos.c.id == gone))
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    shrunk = assert_query_matches_photos(db, astronaut.id)
    assert shrunk["photo_count"] == grown["photo_count"] - 1
    assert shrunk["input_sha256"] not in (grown["input_sha256"], before["input_sha256"])

    # Every remaining photo is replaced by one that shows nobody: no READY photo, so the vector goes.
    nobody = tmp_path / "nobody.png"
    render_no_person(nobody, 5)
    with db.transaction() as conn:
        conn.execute(
            update(person_reference_photos)
            .where(person_reference_photos.c.person_id == astronaut.id)
            .values(uri=str(nobody), sha256=sha256_of(nobody))
        )
    result = materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    assert {p["status"] for p in photo_rows(db, person_id=astronaut.id).values()} == {"FAILED"}
    assert astronaut.id not in query_rows(db)
    assert metadata(result, "person_query_embeddings")["stray_rows_deleted"] == 1


def test_a_deleted_person_loses_its_vector(db, corpus, resources, instance, person_detector):
    owner = corpus.owners[0]
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    before = query_rows(db)
    gone = next(iter(before))
    with db.transaction() as conn:
        conn.execute(persons.delete().where(persons.c.id == gone))  # photos and vectors cascade
    materialize_owner([person_query_embeddings], owner.id, resources, instance, person_detector)
    assert query_rows(db) == {k: v for k, v in before.items() if k != gone}


def test_only_the_current_photo_step_version_counts(db, corpus, resources, instance, person_detector):
    owner = corpus.owners[0]
    astronaut = next(p for p in owner.persons if p.key == "astronaut")
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    current = query_rows(db)[astronaut.id]
    # A vector left by an older photo step (another model, other space) must not blend in.
    old = vector_rows(db)[astronaut.photos[0].id] | {"step_version": "2025-01-01", "model_id": "old-model"}
    old["embedding"] = -np.asarray(old["embedding"])
    del old["created_at"]
    with db.transaction() as conn:
        conn.execute(insert(person_photo_vectors).values(old))

    materialize_owner([person_query_embeddings], owner.id, resources, instance, person_detector)

    assert query_rows(db)[astronaut.id] == current


def test_second_run_changes_nothing(db, corpus, resources, instance, person_detector):
    owner = corpus.owners[0]
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    first = query_rows(db)
    assert first
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    assert query_rows(db) == first  # created_at included


def test_materialising_one_owner_leaves_the_other_untouched(db, corpus, resources, instance, person_detector, tmp_path):
    first, second = corpus.owners
    materialize_owner(BOTH, second.id, resources, instance, person_detector)
    materialize_owner(BOTH, first.id, resources, instance, person_detector)

    def snapshot(owner_id):
        with db.engine.connect() as conn:
            failures = conn.execute(select(embedding_failures).where(embedding_failures.c.owner_id == owner_id)).all()
        return (
            photo_rows(db, owner_id=owner_id),
            vector_rows(db, owner_id=owner_id),
            query_rows(db, owner_id=owner_id),
            sorted(tuple(r) for r in failures),
        )

    theirs = snapshot(second.id)
    assert theirs[2]  # the other owner has query vectors to lose
    # The first owner changes a lot: a photo deleted, a broken one added, a person deleted.
    astronaut = next(p for p in first.persons if p.key == "astronaut")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    add_photo(db, astronaut.id, first.id, tmp_path / "broken.png")
    with db.transaction() as conn:
        conn.execute(person_reference_photos.delete().where(person_reference_photos.c.id == astronaut.photos[0].id))
        conn.execute(persons.delete().where(persons.c.id == next(p.id for p in first.persons if p is not astronaut)))
    materialize_owner(BOTH, first.id, resources, instance, person_detector)

    assert snapshot(second.id) == theirs
    assert snapshot(first.id)[2] != theirs[2]  # the first owner did change


def test_both_assets_carry_their_step_version_and_the_owner_partitions():
    for asset, step in ((person_photo_embeddings, "person_photo"), (person_query_embeddings, "person_query")):
        assert asset.code_versions_by_key[asset.key] == SPEC.step(step).version
        assert asset.partitions_def == owners_partitions
    assert person_query_embeddings.dependency_keys == {person_photo_embeddings.key}


def test_a_person_whose_photos_all_fail_loses_its_query_vector_and_cannot_be_searched(
    db, corpus, resources, instance, clip, person_detector, tmp_path
):
    owner = corpus.owners[0]
    astronaut = next(p for p in owner.persons if p.key == "astronaut")
    other = next(p for p in owner.persons if p is not astronaut)
    materialize_owner(BOTH, owner.id, resources, instance, person_detector)
    # The query vector is made by the photo step's model: the same identity as the photo rows.
    model_id = person_identity(clip, person_detector)
    assert {r["model_id"] for r in vector_rows(db).values()} == {model_id}
    assert {r["model_id"] for r in query_rows(db).values()} == {model_id}
    with db.engine.connect() as conn:
        vector, found_model = person_query_vector(conn, owner.id, astronaut.id)
    assert found_model == model_id
    np.testing.assert_allclose(vector, query_rows(db)[astronaut.id]["embedding"], atol=1e-6)
    kept = query_rows(db)[other.id]

    # Every photo of the astronaut is re-uploaded as a text file (its sha256 declared): all FAILED.
    for i, ph in enumerate(astronaut.photos):
        text_file = tmp_path / f"upload-{i}.png"
        text_file.write_text(f"upload {i} went wrong")
        with db.transaction() as conn:
            conn.execute(
                update(person_reference_photos)
                .where(person_reference_photos.c.id == ph.id)
                .values(uri=str(text_file), sha256=sha256_of(text_file))
            )
    # The photos are stale; the query vectors follow them in the plan (they read the photo rows).
    assert owner_state(db, PERSON_PHOTO, resources, person_detector, owner.id, tmp_path).state == "stale"

    result = materialize_owner(BOTH, owner.id, resources, instance, person_detector)

    photos = photo_rows(db, person_id=astronaut.id)
    assert {p["status"] for p in photos.values()} == {"FAILED"}
    assert all(p["failure_reason"].startswith("unreadable image: not a readable image: ") for p in photos.values())
    assert not set(photos) & set(vector_rows(db))
    assert astronaut.id not in query_rows(db)
    assert query_rows(db)[other.id] == kept  # the other person is untouched
    meta = metadata(result, "person_query_embeddings")
    assert (meta["stray_rows_deleted"], meta["items"], meta["failures"]) == (1, len(owner.persons) - 1, 0)
    with db.engine.connect() as conn, pytest.raises(SearchError, match="has no query vector"):
        person_query_vector(conn, owner.id, astronaut.id)
    assert owner_state(db, PERSON_QUERY, resources, person_detector, owner.id, tmp_path).state == "fresh"
