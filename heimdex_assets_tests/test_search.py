"""The read path over all six assets of a small demo corpus, on the real OpenSearch and PostgreSQL."""

import uuid

import dagster as dg
import pytest
from opensearchpy import OpenSearch
from sqlalchemy import text

from heimdex_assets.assets import OWNER_ASSETS, VIDEO_ASSETS
from heimdex_assets.demo import build_corpus, load_corpus
from heimdex_assets.launch import contiguous_ranges, materialize_ranges
from heimdex_assets.resources import AppDatabase, BlobStore, OpenCvPersonDetector, SearchIndex
from heimdex_assets.search import SearchError, reciprocal_rank_fusion, search_scenes
from heimdex_assets_tests.conftest import ALL_TABLES, OPENSEARCH_URL


@pytest.fixture(scope="module")
def world(database_url, clip, text_embedder, tmp_path_factory):
    """Three owners' corpus with every asset materialised once for the module's tests."""
    db = AppDatabase(url=database_url)
    with db.transaction() as conn:
        conn.execute(text(f"TRUNCATE {ALL_TABLES} CASCADE"))
    corpus = build_corpus(
        tmp_path_factory.mktemp("media"),
        videos_per_owner=2,
        scenes_per_video=5,
        processing_videos=0,
        real_photo_every=2,
    )
    with db.transaction() as conn:
        load_corpus(conn, corpus)
    prefix = f"test-search-{uuid.uuid4().hex[:8]}"
    resources = {
        "db": db,
        "clip": clip,
        "text_embedder": text_embedder,
        "blobs": BlobStore(),
        "search_index": SearchIndex(opensearch_url=OPENSEARCH_URL, index_prefix=prefix),
        "person_detector": OpenCvPersonDetector(),
    }
    with dg.instance_for_test() as instance:
        for name, keys, assets in (
            ("videos", [str(v.id) for v in corpus.videos], VIDEO_ASSETS),
            ("owners", [str(o.id) for o in corpus.owners], OWNER_ASSETS),
        ):
            instance.add_dynamic_partitions(name, keys)
            outcomes = materialize_ranges(assets, contiguous_ranges(keys, set(keys), 50), resources, instance)
            assert all(o.success for o in outcomes), [o.error for o in outcomes]
    yield corpus, resources
    OpenSearch(hosts=[OPENSEARCH_URL]).indices.delete(index=f"{prefix}-*")


def run(world, owner, query, **kw):
    _, r = world
    return search_scenes(
        r["db"], owner.id, query, text_embedder=r["text_embedder"], clip=r["clip"], search_index=r["search_index"], **kw
    )


@pytest.mark.parametrize("mode", ["lexical", "semantic", "hybrid"])
@pytest.mark.parametrize("word", ["narwhal", "theremin", "zeppelin"])
def test_each_mode_finds_the_scene_a_query_was_written_for(world, mode, word):
    corpus, _ = world
    target = corpus.distinctive[word]
    owner = next(o for o in corpus.owners if o.id == target.owner_id)
    results = run(world, owner, f"the {word}", mode=mode)
    assert results[0].scene_id == target.id
    assert results[0].video_id == target.video_id and results[0].scene_index == target.scene_index
    assert (results[0].start_s, results[0].end_s) == (target.start_s, target.end_s)
    if mode != "semantic":
        assert word in results[0].snippet.lower()


@pytest.mark.parametrize("mode", ["lexical", "semantic", "hybrid"])
def test_no_result_ever_belongs_to_another_owner(world, mode):
    corpus, _ = world
    for owner in corpus.owners:
        mine = {s.id for v in owner.videos for s in v.scenes}
        own_word = next(w for w, s in corpus.distinctive.items() if s.owner_id == owner.id)
        for word in ("narwhal", "theremin", "zeppelin", "harbor bread concert"):
            results = run(world, owner, word, mode=mode, limit=50)
            assert {r.scene_id for r in results} <= mine
            assert results or word != own_word  # the owner's own word always finds something


def test_a_person_query_ranks_the_scenes_showing_that_person_first(world):
    corpus, _ = world
    for owner in corpus.owners:
        for person in owner.persons:
            shown = {s.id for v in owner.videos for s in v.scenes if s.shows_person == person.key}
            assert shown, "the corpus must show each person somewhere"
            results = run(world, owner, "", person_id=person.id, limit=len(shown))
            assert {r.scene_id for r in results} == shown, person.key


def test_a_person_of_another_owner_is_refused_like_an_unknown_one(world):
    corpus, _ = world
    mine, theirs = corpus.owners[0], corpus.owners[1]
    with pytest.raises(SearchError, match=f"person {theirs.persons[0].id} not found for owner {mine.id}"):
        run(world, mine, "", person_id=theirs.persons[0].id)
    with pytest.raises(SearchError, match="empty query"):
        run(world, mine, "  ")


def test_reciprocal_rank_fusion_rewards_agreement():
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    fused = reciprocal_rank_fusion({"x": [a, b], "y": [b, c]})
    assert [s for s, _ in fused] == [b, a, c]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
