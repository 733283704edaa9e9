import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import select

from heimdex_assets.assets import scene_text_embeddings
from heimdex_assets.db.tables import scene_text_vectors
from heimdex_assets.resources import TextEmbedder
from heimdex_assets.resources.text_embedder import (
    MAX_INPUTS_PER_REQUEST,
    MAX_TOKENS_PER_REQUEST,
    EmbeddingProviderError,
    plan_requests,
)
from heimdex_assets.runs import FORCE_TAG
from heimdex_assets.tokens import count_tokens
from heimdex_assets_tests.conftest import materialize_videos
from heimdex_assets_tests.fake_openai import fake_vector

API_KEY = "sk-test-NEVER-LOG-THIS-0123456789"


def openai_embedder(fake, **overrides) -> TextEmbedder:
    return TextEmbedder(
        provider="openai", openai_api_key=API_KEY, openai_base_url=fake.url, backoff_base_s=0.05, **overrides
    )


def unit(v):
    return v / np.linalg.norm(v)


@pytest.mark.parametrize(
    ("tokens", "max_inputs", "max_tokens", "expected"),
    [
        ([1] * 5000, MAX_INPUTS_PER_REQUEST, MAX_TOKENS_PER_REQUEST, [2048, 2048, 904]),
        ([8192] * 40, MAX_INPUTS_PER_REQUEST, MAX_TOKENS_PER_REQUEST, [36, 4]),
        ([3, 3, 3, 3], 10, 6, [2, 2]),
        ([10], 10, 6, [1]),  # one input over the request budget still goes, alone
        ([], 10, 6, []),
    ],
)
def test_requests_stay_within_the_api_limits(tokens, max_inputs, max_tokens, expected):
    batches = plan_requests(tokens, max_inputs, max_tokens)
    assert [len(b) for b in batches] == expected
    assert [i for b in batches for i in b] == list(range(len(tokens)))


def test_texts_are_sent_in_batches_and_come_back_in_order_normalised(fake_openai):
    texts = [f"sentence number {i}" for i in range(12)]
    batch = openai_embedder(fake_openai, max_inputs_per_request=5).embed_texts(texts)
    assert [len(r["input"]) for r in fake_openai.requests] == [5, 5, 2]
    assert all(r["model"] == "text-embedding-3-small" for r in fake_openai.requests)
    np.testing.assert_allclose(batch.vectors, [unit(fake_vector(t)) for t in texts], atol=1e-6)
    assert batch.requests == 3 and batch.truncated == [False] * 12


def test_a_429_is_retried_after_the_servers_retry_after(fake_openai):
    fake_openai.script = [(429, {"Retry-After": "0.6"})]
    started = time.monotonic()
    batch = openai_embedder(fake_openai).embed_texts(["hello"])
    assert time.monotonic() - started >= 0.6
    assert len(fake_openai.requests) == 2 and batch.retries == 1
    np.testing.assert_allclose(batch.vectors[0], unit(fake_vector("hello")), atol=1e-6)


def test_a_500_is_retried_then_a_persistent_one_fails_clearly(fake_openai, caplog):
    fake_openai.script = [(500, {})]
    assert openai_embedder(fake_openai).embed_texts(["a"]).retries == 1
    fake_openai.requests.clear()
    fake_openai.script = [(500, {})] * 10
    with caplog.at_level(logging.DEBUG), pytest.raises(EmbeddingProviderError) as err:
        openai_embedder(fake_openai, max_retries=2).embed_texts(["a"])
    assert str(err.value) == "OpenAI embeddings failed after 3 attempts: HTTP 500: scripted 500"
    assert len(fake_openai.requests) == 3
    assert API_KEY not in caplog.text and API_KEY not in str(err.value)
    assert fake_openai.headers[0]["authorization"] == f"Bearer {API_KEY}"  # the key did reach the server


def test_a_too_long_input_is_truncated_and_recorded_not_dropped(fake_openai):
    fake_openai.max_input_chars = 1000
    texts = ["short one", "x" * 3000, "short two"]
    batch = openai_embedder(fake_openai).embed_texts(texts)
    assert batch.truncated == [False, True, False]
    accepted = [r["input"] for r in fake_openai.requests if "x" in r["input"][0]][-1]
    assert len(accepted) == 1 and 0 < len(accepted[0]) <= 1000 and set(accepted[0]) == {"x"}
    np.testing.assert_allclose(batch.vectors[1], unit(fake_vector(accepted[0])), atol=1e-6)
    np.testing.assert_allclose(batch.vectors[0], unit(fake_vector("short one")), atol=1e-6)


def test_inputs_over_the_token_limit_are_truncated_before_sending(fake_openai):
    batch = openai_embedder(fake_openai, max_tokens_per_input=100).embed_texts(["word " * 1000, "한국어 " * 500])
    assert batch.truncated == [True, True]
    sent = fake_openai.requests[0]["input"]
    # Cut at the model's own 100th token, on a character boundary.
    assert count_tokens(sent, "text-embedding-3-small") == [100, 100]
    assert sent[0] == "word" + " word" * 99
    assert ("한국어 " * 500).startswith(sent[1])


def test_requests_are_packed_by_the_models_token_count(fake_openai):
    # "hello world" is 2 cl100k tokens (11 bytes: 4 under the bytes rule), so 3 fit a 6-token request.
    texts = [f"hello world{'!' * i}" for i in range(6)]
    counts = count_tokens(texts, "text-embedding-3-small")
    assert counts == [2, 3, 3, 3, 3, 3]
    openai_embedder(fake_openai, max_tokens_per_request=6).embed_texts(texts)
    assert [len(r["input"]) for r in fake_openai.requests] == [len(b) for b in plan_requests(counts, 2048, 6)]
    assert [len(r["input"]) for r in fake_openai.requests] == [2, 2, 2]


def test_a_400_that_is_not_about_length_is_not_retried(fake_openai):
    fake_openai.script = [(400, {})]
    with pytest.raises(EmbeddingProviderError, match="OpenAI rejected the request: HTTP 400: scripted 400"):
        openai_embedder(fake_openai).embed_texts(["a"])
    assert len(fake_openai.requests) == 1


def test_an_unreachable_server_fails_with_a_clear_message():
    embedder = TextEmbedder(
        provider="openai",
        openai_api_key=API_KEY,
        openai_base_url="http://127.0.0.1:9/v1",
        max_retries=1,
        backoff_base_s=0.01,
    )
    with pytest.raises(EmbeddingProviderError, match="failed after 2 attempts: APIConnectionError") as err:
        embedder.embed_texts(["a"])
    assert API_KEY not in str(err.value)


def test_the_asset_caches_texts_so_a_second_run_sends_no_request(db, rows, resources, instance, fake_openai):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=3)
    resources = resources | {"text_embedder": openai_embedder(fake_openai)}
    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    # The 6 channel texts, then the evaluation gate's known-item queries (one per scene) before the flip.
    assert [len(r["input"]) for r in fake_openai.requests] == [6, 3]
    with db.engine.connect() as conn:
        written = conn.execute(select(scene_text_vectors)).all()
    assert {(r.model_id, r.dimension) for r in written} == {("text-embedding-3-small", 1536)}

    # A plain rerun has nothing to compute; a forced one recomputes every item, all from the cache.
    result = materialize_videos([scene_text_embeddings], [str(video)], resources, instance)
    meta = result.asset_materializations_for_node("scene_text_embeddings")[0].metadata
    assert meta["items_unchanged"].value == 6 and meta["api_requests"].value == 0
    result = materialize_videos([scene_text_embeddings], [str(video)], resources, instance, tags={FORCE_TAG: "true"})
    assert len(fake_openai.requests) == 2  # nothing was paid for twice, and the gate ran once
    meta = result.asset_materializations_for_node("scene_text_embeddings")[0].metadata
    assert meta["items_computed"].value == 6
    assert meta["reused_from_cache"].value == 6 and meta["api_requests"].value == 0


def test_auto_provider_is_local_without_a_key_and_openai_with_one():
    assert TextEmbedder().resolved_provider == "local"
    assert TextEmbedder().model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert TextEmbedder(openai_api_key="sk-x").resolved_provider == "openai"


@pytest.mark.parametrize(
    "query",
    ["narwhal tusks in the arctic", "A", "Ünïcödé text — with dashes and 'quotes'", "word " * 400],
)
def test_a_local_query_vector_is_the_models_own(text_embedder, query):
    """The NumPy forward pass a search uses gives sentence-transformers' vector (long inputs truncated alike)."""
    assert text_embedder.resolved_provider == "local"
    expected = text_embedder.embed_texts([query]).vectors[0]
    got = text_embedder.embed_query(query)
    assert got.shape == (384,) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-5
    assert float(np.linalg.norm(got)) == pytest.approx(1.0, abs=1e-6)


def test_a_local_query_imports_no_torch():
    script = (
        "import sys\n"
        "from heimdex_assets.resources import TextEmbedder\n"
        "v = TextEmbedder(provider='local').embed_query('a query')\n"
        "assert v.shape == (384,)\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
