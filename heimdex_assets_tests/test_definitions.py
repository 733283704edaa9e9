import dagster as dg

from heimdex_assets.definitions import defs
from heimdex_assets.launch import MAX_PARTITIONS_PER_RUN
from heimdex_assets.partitions import videos_partitions
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION, SPEC


def test_definitions_load_and_validate():
    dg.Definitions.validate_loadable(defs)


def test_embedding_assets_carry_their_spec_step_version_and_partitions():
    repo = defs.get_repository_def()
    for name in ("scene_text_embeddings", "scene_clip_embeddings", "scene_person_embeddings", "scene_search_index"):
        assets_def = repo.assets_defs_by_key[dg.AssetKey(name)]
        step = SPEC.step_for_asset(name)
        assert assets_def.code_versions_by_key[dg.AssetKey(name)] == step.version
        assert assets_def.partitions_def == videos_partitions
        assert assets_def.backfill_policy.max_partitions_per_run == MAX_PARTITIONS_PER_RUN


def test_sources_are_in_the_graph_for_lineage():
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("scenes") in graph.get(dg.AssetKey("scene_clip_embeddings")).parent_keys
    assert dg.AssetKey("videos") in graph.get(dg.AssetKey("scenes")).parent_keys


def test_spec_matches_the_guide():
    assert LATEST_EMBEDDING_SPEC_VERSION == "2026-01-06"
    text = SPEC.step("scene_text")
    assert text.enabled_channels == ("transcript", "visual")
    assert [c.name for c in text.channels] == ["transcript", "visual", "summary"]
    assert {s.asset_key for s in SPEC.steps} == {
        "scene_text_embeddings",
        "scene_clip_embeddings",
        "scene_person_embeddings",
        "person_photo_embeddings",
        "person_query_embeddings",
        "scene_search_index",
    }
