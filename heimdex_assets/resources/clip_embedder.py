"""CLIP image (and text) vectors through open_clip, L2-normalised.

The model id every vector carries is known from configuration alone (no torch, no weights), and
the configured weights either load or fail with ``ClipWeightsUnavailableError``: placeholder
weights are used only when asked for (``model_name="tiny-random"``), never as a silent fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from PIL import Image
from pydantic import PrivateAttr

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "clip_configs"
TINY_MODEL = "heimdex-tiny"
TINY_RANDOM_MODEL = "tiny-random"
TINY_RANDOM_MODEL_ID = "open_clip:tiny-random"
HOW_TO_CONFIGURE = (
    "set HEIMDEX_CLIP_CHECKPOINT to a local open_clip checkpoint, "
    "or HEIMDEX_CLIP_MODEL=tiny-random for placeholder weights"
)


class ClipWeightsUnavailableError(RuntimeError):
    """The configured CLIP weights could not be loaded. The message is one line: what, why, what to set."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# (resolved path, size, mtime_ns) -> sha256: each checkpoint version is hashed once per process.
_CHECKPOINT_SHA256: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(checkpoint_path: str) -> str:
    """Hex sha256 of a checkpoint file, cached while its size and mtime stay the same."""
    path = Path(checkpoint_path).expanduser()
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError:
        raise ClipWeightsUnavailableError(f"CLIP checkpoint {path} not found; {HOW_TO_CONFIGURE}") from None
    if not resolved.is_file():
        raise ClipWeightsUnavailableError(f"CLIP checkpoint {path} is not a file; {HOW_TO_CONFIGURE}")
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKPOINT_SHA256:
        try:
            _CHECKPOINT_SHA256[key] = file_sha256(resolved)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ClipWeightsUnavailableError(
                f"CLIP checkpoint {path} could not be read ({reason}); {HOW_TO_CONFIGURE}"
            ) from None
    return _CHECKPOINT_SHA256[key]


def clip_model_id(model_name: str, pretrained: str | None, checkpoint_path: str | None) -> str:
    """The id vectors of this configuration carry, from configuration alone (no torch, no weights).

    A checkpoint's id holds its content hash, so new weights under the same path make vectors stale.
    """
    if model_name == TINY_RANDOM_MODEL:
        return TINY_RANDOM_MODEL_ID
    if checkpoint_path:
        return f"open_clip:{model_name}@sha256:{checkpoint_sha256(checkpoint_path)[:16]}"
    if pretrained:
        return f"open_clip:{model_name}/{pretrained}"
    return f"open_clip:{model_name}/random"


class LoadedClip:
    """A loaded open_clip model with its preprocessing, tokenizer and the id its vectors carry."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, model_id: str, device: str) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.dimension = int(
            model.text_projection.shape[1]
            if hasattr(model, "text_projection") and model.text_projection is not None
            else model.visual.output_dim
        )


HUB_HOST = "huggingface.co"


def _go_offline_if_hub_unreachable() -> None:
    """Without a route to the model hub, a lookup retries for about 45 s before failing: probe first
    (DNS + TCP, 3 s) and switch the hub client to offline mode, which still finds cached weights."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError:
        # The flag is read at import; the module global is what later calls consult (hub 1.x/2.x).
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip without the hub client
        return False
    return bool(constants.is_offline_mode())


def _failure_reason(exc: Exception, model_name: str, pretrained: str | None, checkpoint_path: str | None) -> str:
    """A short reason in our words: no traceback, no URLs or tokens from the underlying error."""
    message = str(exc)
    if message.startswith("Model config for"):
        return f"unknown open_clip model {model_name!r}"
    if checkpoint_path:
        return f"not a valid open_clip checkpoint for {model_name}: {type(exc).__name__}"
    if "is not a known tag or valid file path" in message:
        return f"unknown pretrained tag {pretrained!r} for {model_name}"
    if message.startswith("Failed to download weights") or isinstance(exc, OSError):
        if _hub_offline():
            return "not in the local cache and the model hub is offline or unreachable"
        return "download from the model hub failed"
    return f"{type(exc).__name__} while loading"


def load_clip(model_name: str, pretrained: str | None, checkpoint_path: str | None, device: str) -> LoadedClip:
    """The configured model: a checkpoint file, hub weights for a pretrained tag, random weights when
    ``pretrained`` is empty, or the seeded tiny placeholder for ``tiny-random``.

    Raises ``ClipWeightsUnavailableError`` (one line) when the configured weights cannot be loaded.
    """
    model_id = clip_model_id(model_name, pretrained, checkpoint_path)  # a missing checkpoint fails here
    import open_clip
    import torch

    open_clip.add_model_config(CONFIG_DIR)
    device = _pick_device(device)
    # open_clip reports a failed download on the root logger; we report it once, in our words.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        if model_name == TINY_RANDOM_MODEL:
            # Seeded, so every process makes the same placeholder model and re-runs stay idempotent.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, device=device)
            tokenizer_name = TINY_MODEL
        elif checkpoint_path:
            path = Path(checkpoint_path).expanduser()
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), device=device, require_pretrained=True
            )
            tokenizer_name = model_name
        else:
            if pretrained and not Path(pretrained).is_file():
                _go_offline_if_hub_unreachable()
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=device, require_pretrained=bool(pretrained)
            )
            tokenizer_name = model_name
    except Exception as exc:
        if model_name == TINY_RANDOM_MODEL:
            what = TINY_RANDOM_MODEL
        elif checkpoint_path:
            what = f"checkpoint {Path(checkpoint_path).expanduser()}"
        else:
            what = f"{model_name}/{pretrained or 'random'}"
        reason = _failure_reason(exc, model_name, pretrained, checkpoint_path)
        line = " ".join(f"CLIP weights {what} could not be loaded ({reason}); {HOW_TO_CONFIGURE}".split())
        raise ClipWeightsUnavailableError(line) from None
    finally:
        root.setLevel(level)
    if clip_model_id(model_name, pretrained, checkpoint_path) != model_id:
        raise ClipWeightsUnavailableError(
            f"CLIP checkpoint {checkpoint_path} changed while it was loading; load it again once it is written"
        )
    model.eval()
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(tokenizer_name), model_id, device)


# Process-wide: one loaded model per configuration, however many resources or runs ask for it.
_LOADED: dict[tuple, LoadedClip] = {}
_LOAD_LOCK = threading.Lock()


class ClipEmbedder(dg.ConfigurableResource):
    """open_clip model (ViT-B-32 with ``openai`` weights by default) on CPU or CUDA.

    ``checkpoint_path`` loads weights from a local file instead of the hub. ``model_name="tiny-random"``
    asks for a small seeded random CLIP (placeholder vectors, model id ``open_clip:tiny-random``, so
    they never pass for real ones); it ignores ``pretrained`` and ``checkpoint_path``. Configured
    weights that cannot be loaded raise ``ClipWeightsUnavailableError``: there is no silent fallback.
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    checkpoint_path: str | None = None
    device: str = "auto"
    batch_size: int = 32

    _clip: LoadedClip | None = PrivateAttr(default=None)

    def _loaded(self) -> LoadedClip:
        expected = self.model_id
        if self._clip is not None and self._clip.model_id == expected:
            return self._clip
        key = (self.model_name, self.pretrained, self.checkpoint_path, self.device)
        with _LOAD_LOCK:
            clip = _LOADED.get(key)
            if clip is None or clip.model_id != expected:  # new bytes under the same checkpoint path
                clip = load_clip(self.model_name, self.pretrained, self.checkpoint_path, self.device)
                if clip.model_id != expected:
                    raise ClipWeightsUnavailableError(
                        f"CLIP model loaded as {clip.model_id}, configured as {expected}; load it again"
                    )
                _LOADED[key] = clip
        self._clip = clip
        return clip

    def ensure_loaded(self) -> None:
        """Load the model now (once per process), so a missing model fails up front.

        Raises ``ClipWeightsUnavailableError`` with a one-line message saying what to configure.
        """
        self._loaded()

    @property
    def model_id(self) -> str:
        """The id stored with every vector this model makes, from configuration alone: no torch,
        no weights (a checkpoint file is hashed, once per process and file version)."""
        return clip_model_id(self.model_name, self.pretrained, self.checkpoint_path)

    @property
    def dimension(self) -> int:
        return self._loaded().dimension

    @property
    def is_placeholder(self) -> bool:
        """True for random weights (``tiny-random``, the ``heimdex-tiny`` test architecture, no
        pretrained weights): fine for image-to-image plumbing, meaningless for text-to-image ranking.
        From configuration alone."""
        if self.model_name in (TINY_RANDOM_MODEL, TINY_MODEL):
            return True
        return not self.checkpoint_path and not self.pretrained

    def preprocess(self, image: Image.Image) -> Any:
        """The model's input tensor for one image (CPU; safe to call from worker threads)."""
        return self._loaded().preprocess(image.convert("RGB"))

    def embed_tensors(self, tensors: list[Any]) -> np.ndarray:
        """Unit vectors for preprocessed images, in batches of ``batch_size``."""
        import torch

        clip = self._loaded()
        out = []
        with torch.inference_mode():
            for start in range(0, len(tensors), self.batch_size):
                batch = torch.stack(tensors[start : start + self.batch_size]).to(clip.device)
                feats = clip.model.encode_image(batch).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, clip.dimension), dtype=np.float32)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Unit CLIP vectors of ``images``, one row per image."""
        return self.embed_tensors([self.preprocess(img) for img in images])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit CLIP text vectors (for text-to-image search)."""
        import torch

        clip = self._loaded()
        with torch.inference_mode():
            tokens = clip.tokenizer(texts).to(clip.device)
            feats = clip.model.encode_text(tokens).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()
