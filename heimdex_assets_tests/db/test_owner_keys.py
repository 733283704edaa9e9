"""Ownership enforced by the schema (migration 0008): a row's owner is its parent's, or the row is refused."""

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from alembic import command
from sqlalchemy import create_engine, delete, insert, make_url, select, text, update
from sqlalchemy.exc import IntegrityError

from heimdex_assets.db.engine import _alembic_config, head_revision, normalise_url
from heimdex_assets.db.tables import (
    embedding_failures,
    person_photo_vectors,
    person_query_vectors,
    person_reference_photos,
    persons,
    scene_clip_vectors,
    scene_search_documents,
    scene_text_vectors,
    scenes,
    videos,
)

BEFORE = "0007_reprocess_plans"


def vector_row(table, scene_id, video_id, owner_id) -> dict:
    """A derived row of ``table`` for a scene, as a run writes it."""
    row = {
        "scene_id": scene_id,
        "video_id": video_id,
        "owner_id": owner_id,
        "step_version": "v1",
        "model_id": "m",
        "input_sha256": "h",
    }
    if table is scene_search_documents:
        return row | {"index_name": "scenes-v1"}
    row |= {"dimension": 3, "embedding": np.array([0.1, 0.2, 0.3], dtype=np.float32)}
    return row | ({"channel": "transcript"} if table is scene_text_vectors else {})


def test_a_scene_of_another_owner_than_its_video_is_refused(db, rows):
    a, b = rows.owner("a"), rows.owner("b")
    video = rows.video(a, 0)
    with pytest.raises(IntegrityError, match="scenes_video_owner_fkey"):
        rows.scene(video, b, 0)
    kept = rows.scene(video, a, 0)
    with pytest.raises(IntegrityError, match="scenes_video_owner_fkey"), db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.id == kept).values(owner_id=b))
    with db.engine.connect() as conn:
        assert conn.execute(select(scenes.c.id, scenes.c.owner_id)).all() == [(kept, a)]


@pytest.mark.parametrize("table", [scene_text_vectors, scene_clip_vectors, scene_search_documents])
def test_a_derived_row_of_another_owner_than_its_scene_or_video_is_refused(db, rows, table):
    a, b = rows.owner("a"), rows.owner("b")
    video = rows.video(a, 0)
    scene = rows.scene(video, a, 0)
    b_video = rows.video(b, 0)
    # Another owner than its scene's (and its video's); its scene's owner with another owner's video.
    for values, constraint in (
        (vector_row(table, scene, video, b), f"{table.name}_(scene|video)_owner_fkey"),
        (vector_row(table, scene, b_video, a), f"{table.name}_video_owner_fkey"),
    ):
        with pytest.raises(IntegrityError, match=constraint), db.transaction() as conn:
            conn.execute(insert(table).values(**values))
    with db.transaction() as conn:
        conn.execute(insert(table).values(**vector_row(table, scene, video, a)))
    with db.engine.connect() as conn:
        assert conn.execute(select(table.c.scene_id, table.c.video_id, table.c.owner_id)).all() == [(scene, video, a)]


def failure_row(video_id, owner_id, item_id: str | None = None) -> dict:
    """A failure on record for an item of a video, as a run leaves it."""
    return {
        "step": "scene_clip",
        "item_id": item_id or str(uuid.uuid4()),
        "step_version": "v1",
        "model_id": "m",
        "partition_id": video_id,
        "video_id": video_id,
        "owner_id": owner_id,
        "input_sha256": "h",
        "reason": "unreadable",
    }


def test_failures_and_person_rows_follow_their_parents_owner(db, rows):
    a, b = rows.owner("a"), rows.owner("b")
    video = rows.video(a, 0)
    person = uuid.uuid4()
    with db.transaction() as conn:
        conn.execute(insert(persons).values(id=person, owner_id=a, name="Ada"))
    photo = {"id": uuid.uuid4(), "person_id": person, "uri": "/photos/ada.png", "status": "PENDING"}
    for table, values, constraint in (
        (embedding_failures, failure_row(video, b), "embedding_failures_video_owner_fkey"),
        (person_reference_photos, photo | {"owner_id": b}, "person_reference_photos_person_owner_fkey"),
    ):
        with pytest.raises(IntegrityError, match=constraint), db.transaction() as conn:
            conn.execute(insert(table).values(**values))
    with db.transaction() as conn:  # the parent's owner, or no video at all (owner-partitioned steps)
        conn.execute(insert(embedding_failures).values(**failure_row(video, a, "s1")))
        conn.execute(insert(embedding_failures).values(**failure_row(video, b, "o1") | {"video_id": None}))
        conn.execute(insert(person_reference_photos).values(**photo, owner_id=a))
    with db.engine.connect() as conn:
        assert conn.execute(select(person_reference_photos.c.owner_id)).scalars().all() == [a]
        assert sorted(conn.execute(select(embedding_failures.c.item_id)).scalars()) == ["o1", "s1"]


def test_a_moved_video_takes_its_scenes_along_and_its_derived_rows_go(db, rows):
    a, b = rows.owner("a"), rows.owner("b")
    moved, stays = rows.video(a, 2), rows.video(a, 1)
    with db.transaction() as conn:
        for scene, video in conn.execute(select(scenes.c.id, scenes.c.video_id)).all():
            conn.execute(insert(scene_clip_vectors).values(**vector_row(scene_clip_vectors, scene, video, a)))
            conn.execute(insert(scene_text_vectors).values(**vector_row(scene_text_vectors, scene, video, a)))
        for video in (moved, stays):
            conn.execute(insert(embedding_failures).values(**failure_row(video, a)))

    with db.transaction() as conn:
        conn.execute(update(videos).where(videos.c.id == moved).values(owner_id=b))

    with db.engine.connect() as conn:
        owners = dict(conn.execute(select(scenes.c.video_id, scenes.c.owner_id).distinct()).all())
        assert owners == {moved: b, stays: a}  # its scenes are b's now: source data follows
        for table in (scene_clip_vectors, scene_text_vectors, embedding_failures):  # computed for a: gone
            assert set(conn.execute(select(table.c.video_id, table.c.owner_id)).all()) == {(stays, a)}
        # The delete is a change to the partition like any other: freshness will redo it, for b.
        stamped = conn.execute(text("SELECT source FROM input_stamps WHERE partition_id = :v"), {"v": moved})
        assert {"videos", "scenes", "scene_clip_vectors", "scene_text_vectors"} <= set(stamped.scalars())
    with db.transaction() as conn:  # and deleting a video still takes everything with it
        conn.execute(delete(videos).where(videos.c.id == stays))
    with db.engine.connect() as conn:
        assert set(conn.execute(select(scenes.c.video_id)).scalars()) == {moved}
        assert conn.execute(select(scene_clip_vectors.c.scene_id)).all() == []
        assert conn.execute(select(embedding_failures.c.item_id)).all() == []


def test_a_moved_person_takes_its_photos_along_and_their_vectors_go(db, rows):
    a, b = rows.owner("a"), rows.owner("b")
    ada, bob = uuid.uuid4(), uuid.uuid4()
    photos = {uuid.uuid4(): ada, uuid.uuid4(): ada, uuid.uuid4(): bob}
    vector = {"step_version": "v1", "model_id": "m", "input_sha256": "h", "dimension": 3, "embedding": [1, 2, 3]}
    with db.transaction() as conn:
        conn.execute(insert(persons), [{"id": p, "owner_id": a, "name": "p"} for p in (ada, bob)])
        conn.execute(
            insert(person_reference_photos),
            [
                {"id": f, "person_id": p, "owner_id": a, "uri": f"/{f}.png", "status": "READY"}
                for f, p in photos.items()
            ],
        )
        conn.execute(
            insert(person_photo_vectors),
            [vector | {"photo_id": f, "person_id": p, "owner_id": a} for f, p in photos.items()],
        )
        conn.execute(
            insert(person_query_vectors),
            [vector | {"person_id": p, "owner_id": a, "photo_count": 1} for p in (ada, bob)],
        )

    with db.transaction() as conn:
        conn.execute(update(persons).where(persons.c.id == ada).values(owner_id=b))

    with db.engine.connect() as conn:
        photo_owners = dict(
            conn.execute(select(person_reference_photos.c.id, person_reference_photos.c.owner_id)).all()
        )
        assert photo_owners == {f: (b if p == ada else a) for f, p in photos.items()}
        assert set(conn.execute(select(person_photo_vectors.c.person_id, person_photo_vectors.c.owner_id))) == {
            (bob, a)
        }
        assert set(conn.execute(select(person_query_vectors.c.person_id, person_query_vectors.c.owner_id))) == {
            (bob, a)
        }


@pytest.fixture
def scratch_url(database_url: str) -> Iterator[str]:
    """An empty database of its own on the test server: migrations go up and down there, not in the shared one."""
    name = f"heimdex_owner_keys_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalise_url(database_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(normalise_url(database_url)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def alembic(engine, action: str, revision: str) -> None:
    """Run alembic's upgrade or downgrade in one transaction, as ``engine.migrate`` does."""
    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def sql(engine, statement: str, **params) -> list:
    with engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return result.all() if result.returns_rows else []


def test_the_upgrade_names_existing_mismatches_and_changes_nothing_until_they_are_fixed(scratch_url, caplog):
    assert head_revision() != BEFORE  # 0008 (or later) is what this upgrades to
    engine = create_engine(scratch_url)
    alembic(engine, "upgrade", BEFORE)
    a, b, video, good, bad, person, photo = (uuid.uuid4() for _ in range(7))
    gone_video = uuid.uuid4()
    sql(engine, "INSERT INTO owners (id, name) VALUES (:a, 'a'), (:b, 'b')", a=a, b=b)
    sql(engine, "INSERT INTO videos (id, owner_id, status) VALUES (:v, :a, 'READY')", v=video, a=a)
    scene = "INSERT INTO scenes (id, video_id, owner_id, scene_index, start_s, end_s) VALUES (:id, :v, :o, :i, 0, 1)"
    sql(engine, scene, id=good, v=video, o=a, i=0)
    sql(engine, scene, id=bad, v=video, o=b, i=1)  # the bug: b's scene in a's video
    sql(engine, "INSERT INTO persons (id, owner_id, name) VALUES (:p, :a, 'Ada')", p=person, a=a)
    sql(
        engine,
        "INSERT INTO person_reference_photos (id, person_id, owner_id, uri) VALUES (:f, :p, :b, '/x.png')",
        f=photo,
        p=person,
        b=b,
    )
    failure = (
        "INSERT INTO embedding_failures (step, item_id, step_version, model_id, partition_id, video_id, owner_id, "
        "input_sha256, reason) VALUES ('scene_clip', :item, 'v1', 'm', :v, :v, :a, 'h', 'bad')"
    )
    sql(engine, failure, item=str(good), v=video, a=a)
    sql(engine, failure, item="of-a-deleted-video", v=gone_video, a=a)
    # A vector row that names a video its scene is not in, and which does not exist.
    sql(
        engine,
        "INSERT INTO scene_clip_vectors (scene_id, step_version, video_id, owner_id, model_id, input_sha256, "
        "dimension, embedding) VALUES (:s, 'v1', :v, :a, 'm', 'h', 3, '[1,2,3]')",
        s=good,
        v=gone_video,
        a=a,
    )

    with pytest.raises(RuntimeError) as err:
        alembic(engine, "upgrade", "head")
    message = str(err.value)
    assert "\n" not in message
    assert f"scenes: 1 row(s) whose owner_id is not their video's (e.g. id {bad}, video_id {video}" in message
    assert f"person_reference_photos: 1 row(s) whose owner_id is not their person's (e.g. id {photo}" in message
    assert f"scene_clip_vectors: 1 row(s) whose video does not exist (e.g. scene_id {good}, video_id {gone_video}" in (
        message
    )
    assert message in caplog.text
    assert "deleted" not in caplog.text  # the stale failure's delete was rolled back with the rest
    # Nothing happened: still at 0007, the rows as they were, the stale failure too (rolled back with the rest).
    assert sql(engine, "SELECT version_num FROM alembic_version") == [(BEFORE,)]
    assert sql(engine, "SELECT id, owner_id FROM scenes ORDER BY scene_index") == [(good, a), (bad, b)]
    assert sql(engine, "SELECT count(*) FROM embedding_failures") == [(2,)]
    assert sql(engine, "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%owner_fkey'") == [(0,)]

    # Once an operator has decided whose rows they are, the upgrade goes through.
    sql(engine, "UPDATE scenes SET owner_id = :a WHERE id = :s", a=a, s=bad)
    sql(engine, "UPDATE person_reference_photos SET owner_id = :a WHERE id = :f", a=a, f=photo)
    sql(engine, "DELETE FROM scene_clip_vectors")
    alembic(engine, "upgrade", "head")
    assert sql(engine, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    assert sql(engine, "SELECT item_id FROM embedding_failures") == [(str(good),)]
    assert "deleted 1 embedding_failures row(s) of videos that no longer exist" in caplog.text
    with pytest.raises(IntegrityError, match="scenes_video_owner_fkey"):
        sql(engine, scene, id=uuid.uuid4(), v=video, o=b, i=2)
    moved = sql(engine, "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE '%owner_moved' ORDER BY 1")
    assert [r[0] for r in moved] == ["person_reference_photos", "persons", "scenes", "videos"]

    # Down again: the plain foreign keys of 0001/0002 are back, and with them the old freedom.
    alembic(engine, "downgrade", BEFORE)
    fkeys = {r[0] for r in sql(engine, "SELECT conname FROM pg_constraint WHERE contype = 'f'")}
    assert {"scenes_video_id_fkey", "scene_text_vectors_scene_id_fkey", "person_photo_vectors_photo_id_fkey"} <= fkeys
    assert not {k for k in fkeys if k.endswith("_owner_fkey")}
    assert sql(engine, "SELECT tgname FROM pg_trigger WHERE tgname LIKE '%owner_moved'") == []
    sql(engine, scene, id=uuid.uuid4(), v=video, o=b, i=2)
    with pytest.raises(RuntimeError, match="scenes: 1 row"):
        alembic(engine, "upgrade", "head")
    engine.dispose()
