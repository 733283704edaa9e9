import hashlib
import shutil

import pytest
import tiktoken

from heimdex_assets.tokens import (
    ENCODINGS_DIR,
    count_tokens,
    encoding_for_model,
    shipped_encoding,
    truncate_to_tokens,
)

TEXTS = [
    "tiktoken is great!",
    "The lighthouse keeper polished the lens at dusk.",
    "등대지기는 해질녘에 렌즈를 닦았다.",
    "🚢⚓ 12345678 boats, 3.14159 knots",
    "def f(x):\n    return x ** 2  # squared",
    "many     spaces   and\ttabs\n\nthen   more   ",
    "I'm sure they'll say <|endoftext|> is just text",
]


def test_the_shipped_cl100k_is_openais():
    cl100k = shipped_encoding("cl100k_base")
    # The ids OpenAI's cookbook shows for this sentence.
    assert cl100k.encode_ordinary("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert cl100k.n_vocab == 100277
    assert all(cl100k.decode(cl100k.encode_ordinary(t)) == t for t in TEXTS)


def test_the_shipped_cl100k_equals_tiktokens_own_given_the_same_file(tmp_path, monkeypatch):
    # tiktoken's own definition (pattern, special tokens) fed from its cache instead of the network.
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(ENCODINGS_DIR / "cl100k_base.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken's process-wide memo
    theirs = tiktoken.get_encoding("cl100k_base")
    ours = shipped_encoding("cl100k_base")
    assert theirs._pat_str == ours._pat_str and theirs._special_tokens == ours._special_tokens
    assert [theirs.encode_ordinary(t) for t in TEXTS] == [ours.encode_ordinary(t) for t in TEXTS]


@pytest.mark.parametrize("model", ["text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"])
def test_openai_embedding_models_count_with_cl100k(model):
    cl100k = shipped_encoding("cl100k_base")
    assert encoding_for_model(model) is cl100k
    assert count_tokens(TEXTS, model) == [len(cl100k.encode_ordinary(t)) for t in TEXTS]


def test_a_model_without_a_shipped_tokenizer_is_over_estimated_from_bytes():
    assert encoding_for_model("sentence-transformers/all-MiniLM-L6-v2") is None
    assert count_tokens(["hello world", "한"], "sentence-transformers/all-MiniLM-L6-v2") == [4, 1]
    assert truncate_to_tokens("abcdefgh", 2, "some-local-model") == "abcdef"


def test_truncation_keeps_whole_characters_within_the_token_limit():
    korean = "등대지기는 해질녘에 렌즈를 닦았다. " * 50
    for limit in (1, 7, 100):
        cut = truncate_to_tokens(korean, limit, "text-embedding-3-small")
        assert korean.startswith(cut) and count_tokens([cut], "text-embedding-3-small")[0] <= limit
    assert truncate_to_tokens("short", 100, "text-embedding-3-small") == "short"
