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
from heimdex_assets.search import (
    HYBRID_RRF_K,
    HYBRID_WEIGHTS,
    SearchError,
    reciprocal_rank_fusion,
    search_scenes,
)
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
        "blobs": BlobStore(allowed_roots=[str(tmp_path_factory.getbasetemp())]),
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


# The distinctive scenes asked for by their word, and by a paraphrase that shares little or none of their text.
KNOWN_ITEMS = [
    *((w, f"the {w}") for w in ("narwhal", "theremin", "zeppelin")),
    ("narwhal", "a whale with a spiral tusk surfacing next to drifting sea ice"),
    ("theremin", "an electronic instrument played by moving the hands near it in the air"),
    ("zeppelin", "the cabin of an old airship that flew across the ocean"),
]


@pytest.mark.parametrize(("word", "query"), KNOWN_ITEMS)
def test_hybrid_ranks_the_known_scene_at_least_as_high_as_the_better_single_mode(world, word, query):
    corpus, _ = world
    target = corpus.distinctive[word]
    owner = next(o for o in corpus.owners if o.id == target.owner_id)
    rank = {}
    for mode in ("lexical", "semantic", "hybrid"):
        found = [r.scene_id for r in run(world, owner, query, mode=mode, limit=10)]
        rank[mode] = found.index(target.id) + 1 if target.id in found else 11
    assert rank["hybrid"] <= min(rank["lexical"], rank["semantic"]), rank


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


def test_reciprocal_rank_fusion_weighs_each_list_by_its_name():
    a, b = uuid.uuid4(), uuid.uuid4()
    assert [s for s, _ in reciprocal_rank_fusion({"x": [a], "y": [b]}, weights={"y": 2})] == [b, a]
    assert [s for s, _ in reciprocal_rank_fusion({"x": [a], "y": [b]}, weights={"z": 2})] == [a, b]  # tie: first seen


def test_hybrid_fusion_keeps_a_scene_first_in_both_lists_first():
    top, *others = (uuid.uuid4() for _ in range(5))
    fused = reciprocal_rank_fusion(
        {"bm25": [top, *others], "text": [top, *reversed(others)]}, k=HYBRID_RRF_K, weights=HYBRID_WEIGHTS
    )
    assert fused[0][0] == top


def test_hybrid_fusion_counts_a_lexical_first_as_a_semantic_sixth():
    lexical_first, *semantic = (uuid.uuid4() for _ in range(7))
    fused = reciprocal_rank_fusion({"bm25": [lexical_first], "text": semantic}, k=HYBRID_RRF_K, weights=HYBRID_WEIGHTS)
    # Its score ties the semantic sixth's; a tie goes to the scene seen first (search_scenes lists bm25 first).
    assert [s for s, _ in fused] == [*semantic[:5], lexical_first, semantic[5]]
