"""Failure isolation across partitions: what goes wrong with one video while a run computes fails that video
alone; the run's other partitions are written, fresh, and the failure names only the one."""

import uuid

import pytest
from sqlalchemy import func, select

from heimdex_assets.assets import scene_text_embeddings
from heimdex_assets.db.tables import embedding_failures, partition_ledger, scene_text_vectors, scenes, videos
from heimdex_assets.freshness import partition_states
from heimdex_assets.resources import TextEmbedder
from heimdex_assets.steps import SCENE_TEXT
from heimdex_assets_tests.conftest import materialize_videos

OPENAI_MODEL = "text-embedding-3-small"


def rows_of(db, table, column, video: str) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(column == uuid.UUID(video))).scalar_one()


@pytest.mark.parametrize("its_texts_fail", [False, True], ids=["with-vectors", "with-failed-items"])
def test_a_video_deleted_while_the_run_computes_fails_alone_and_leaves_nothing(
    db, rows, resources, instance, fake_openai, its_texts_fail
):
    owner = rows.owner()
    keys = sorted(str(rows.video(owner, n_scenes=2)) for _ in range(3))
    doomed = keys[1]  # between two partitions the run writes
    if its_texts_fail:  # no row to write, only failures: nothing but the check refuses them
        with db.engine.connect() as conn:
            items = SCENE_TEXT.items(conn, {"scene_text": OPENAI_MODEL}, [uuid.UUID(doomed)])
        fake_openai.invalid_inputs = {i.payload["text"] for i in items}

    def delete_the_video_while_its_vectors_are_computed(inputs: list[str]) -> None:
        if len(fake_openai.requests) == 1:  # the run's texts, every video's, are in this request
            with db.transaction() as conn:  # as the app deletes a video: its scenes go with it (ON DELETE CASCADE)
                conn.execute(videos.delete().where(videos.c.id == uuid.UUID(doomed)))

    fake_openai.on_request = delete_the_video_while_its_vectors_are_computed
    embedder = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=fake_openai.url)
    result = materialize_videos(
        [scene_text_embeddings], keys, resources | {"text_embedder": embedder}, instance, raise_on_error=False
    )

    # The run fails naming that video, and only it.
    assert not result.success
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert f"1 partition(s) could not be processed: {doomed}: video {doomed} was deleted during the run" in message
    assert all(k not in message for k in keys if k != doomed)
    # The others are written and fresh, as `heimdex status` would show them.
    with db.engine.connect() as conn:
        states = partition_states(conn, SCENE_TEXT, {"scene_text": OPENAI_MODEL})
    assert {k: (s.state, s.items, s.failed_items) for k, s in states.items()} == {
        k: ("fresh", 4, 0) for k in keys if k != doomed
    }
    for k in keys:
        expected = 0 if k == doomed else 4
        assert rows_of(db, scene_text_vectors, scene_text_vectors.c.video_id, k) == expected
    # Nothing of the deleted video remains: no vectors, failures or ledger the discovery sensor would clean up.
    assert rows_of(db, scenes, scenes.c.video_id, doomed) == 0
    assert rows_of(db, embedding_failures, embedding_failures.c.partition_id, doomed) == 0
    assert rows_of(db, partition_ledger, partition_ledger.c.partition_id, doomed) == 0
