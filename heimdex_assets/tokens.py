"""Tokens as the provider counts them: tiktoken's encoding for OpenAI models, shipped with the package.

tiktoken downloads its encoding files on first use; deployments here are offline, so the files the
OpenAI embedding models use (``cl100k_base``) ship in ``resources/encodings`` and are checked against
the sha256 tiktoken itself pins for them. A model without a shipped encoding (the local MiniLM, a
model behind another OpenAI-compatible server) falls back to an over-estimate from UTF-8 bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

ENCODINGS_DIR = Path(__file__).parent / "resources" / "encodings"
# Without a tokenizer: cl100k averages about 4 bytes a token in English, so 3 over-estimates.
BYTES_PER_TOKEN_ESTIMATE = 3


@dataclass(frozen=True)
class ShippedEncoding:
    """An encoding whose ranks file ships with the package, as tiktoken_ext.openai_public defines it."""

    file: str
    sha256: str  # as pinned in tiktoken_ext/openai_public.py
    pat_str: str
    special_tokens: dict[str, int]


SHIPPED_ENCODINGS = {
    "cl100k_base": ShippedEncoding(
        file="cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str="|".join(
            [
                r"""'(?i:[sdmt]|ll|ve|re)""",
                r"""[^\r\n\p{L}\p{N}]?+\p{L}++""",
                r"""\p{N}{1,3}+""",
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*+""",
                r"""\s++$""",
                r"""\s*[\r\n]""",
                r"""\s+(?!\S)""",
                r"""\s""",
            ]
        ),
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}


@functools.cache
def shipped_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` built from the shipped ranks file (hash-checked); KeyError if none ships."""
    import tiktoken

    spec = SHIPPED_ENCODINGS[name]
    data = (ENCODINGS_DIR / spec.file).read_bytes()
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise ValueError(f"encoding file {spec.file} does not match its pinned sha256: reinstall the package")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name=name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens)


def encoding_for_model(model_id: str) -> tiktoken.Encoding | None:
    """The tokenizer the provider bills ``model_id`` with, or None when none ships for it."""
    import tiktoken

    try:
        name = tiktoken.encoding_name_for_model(model_id)
    except KeyError:
        return None
    return shipped_encoding(name) if name in SHIPPED_ENCODINGS else None


def bytes_estimate(text: str) -> int:
    """An over-estimate of ``text``'s tokens from its UTF-8 size, for models without a tokenizer here."""
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE))


def count_tokens(texts: Sequence[str], model_id: str) -> list[int]:
    """Tokens of each text as ``model_id``'s provider counts them (special-token text counted as plain text,
    as the embeddings API does); a byte-based over-estimate when no tokenizer ships for the model."""
    encoding = encoding_for_model(model_id)
    if encoding is None:
        return [bytes_estimate(t) for t in texts]
    # One thread: tiktoken's batch call is slower than this loop on a couple of cores.
    return [len(encoding.encode_ordinary(t)) for t in texts]


def truncate_to_tokens(text: str, max_tokens: int, model_id: str) -> str:
    """``text`` cut to at most ``max_tokens`` of ``model_id``'s tokens, on a character boundary."""
    encoding = encoding_for_model(model_id)
    if encoding is None:
        limit = max_tokens * BYTES_PER_TOKEN_ESTIMATE
        data = text.encode("utf-8")
        return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")
    ids = encoding.encode_ordinary(text)
    return text if len(ids) <= max_tokens else encoding.decode_bytes(ids[:max_tokens]).decode("utf-8", errors="ignore")
