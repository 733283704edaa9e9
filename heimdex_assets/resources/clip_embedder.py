"""CLIP image (and text) vectors through open_clip, L2-normalised."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
from PIL import Image
from pydantic import PrivateAttr

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "clip_configs"
TINY_MODEL = "heimdex-tiny"
TINY_RANDOM_MODEL_ID = "open_clip:tiny-random"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ClipWeightsUnavailableError(RuntimeError):
    """The configured CLIP weights could not be loaded (and no fallback is allowed)."""


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


def load_clip(
    model_name: str, pretrained: str | None, checkpoint_path: str | None, device: str, fallback: str
) -> tuple[LoadedClip, str | None]:
    """The configured model, or the tiny random one when allowed; second item: why it fell back."""
    import open_clip
    import torch

    open_clip.add_model_config(CONFIG_DIR)
    device = _pick_device(device)
    # open_clip reports a failed download on the root logger; we report it once, in our words.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        if checkpoint_path:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), device=device
            )
            # The weights' hash is in the id, so new weights under the same path make vectors stale.
            model_id = f"open_clip:{model_name}@sha256:{file_sha256(path)[:16]}"
        else:
            if pretrained and not Path(pretrained).is_file():
                _go_offline_if_hub_unreachable()
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, require_pretrained=bool(pretrained)
            )
            model_id = f"open_clip:{model_name}/{pretrained}" if pretrained else f"open_clip:{model_name}/random"
        reason = None
        tokenizer_name = model_name
    except Exception as exc:
        what = checkpoint_path or f"{model_name}/{pretrained}"
        detail = str(exc).splitlines()[0].split(": ")[0][:160] if str(exc) else type(exc).__name__
        reason = f"CLIP weights {what} unavailable ({detail})"
        if fallback != "tiny-random":
            raise ClipWeightsUnavailableError(reason) from None
        # Seeded, so every process makes the same placeholder model and re-runs stay idempotent.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, device=device)
        model_id = TINY_RANDOM_MODEL_ID
        tokenizer_name = TINY_MODEL
    finally:
        root.setLevel(level)
    model.eval()
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(tokenizer_name), model_id, device), reason


_LOADED: dict[tuple, tuple[LoadedClip, str | None]] = {}
_LOAD_LOCK = threading.Lock()


class ClipEmbedder(dg.ConfigurableResource):
    """open_clip model (ViT-B-32 with ``openai`` weights by default) on CPU or CUDA.

    ``checkpoint_path`` loads weights from a local file instead of the hub. When the weights
    cannot be had and ``fallback`` is ``tiny-random``, a small seeded random CLIP is used and its
    vectors carry the model id ``open_clip:tiny-random``, so they never pass for real ones.
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    checkpoint_path: str | None = None
    device: str = "auto"
    batch_size: int = 32
    fallback: Literal["none", "tiny-random"] = "tiny-random"

    _clip: LoadedClip | None = PrivateAttr(default=None)

    def _loaded(self) -> LoadedClip:
        if self._clip is None:
            # The model loads once per process, however many resources or runs ask for it.
            key = (self.model_name, self.pretrained, self.checkpoint_path, self.device, self.fallback)
            with _LOAD_LOCK:
                if key not in _LOADED:
                    _LOADED[key] = load_clip(*key)
                    if _LOADED[key][1]:
                        log.warning(
                            "%s; using %s instead (placeholder vectors, stale once real weights load)",
                            _LOADED[key][1],
                            TINY_RANDOM_MODEL_ID,
                        )
            self._clip = _LOADED[key][0]
        return self._clip

    @property
    def model_id(self) -> str:
        """The id stored with every vector this model makes."""
        return self._loaded().model_id

    @property
    def fallback_reason(self) -> str | None:
        """Why the configured weights were not used, or None."""
        self._loaded()
        key = (self.model_name, self.pretrained, self.checkpoint_path, self.device, self.fallback)
        return _LOADED[key][1]

    @property
    def dimension(self) -> int:
        return self._loaded().dimension

    @property
    def is_placeholder(self) -> bool:
        """True for random weights (the tiny fallback, the ``heimdex-tiny`` test architecture, no
        pretrained tag): fine for image-to-image plumbing, meaningless for text-to-image ranking."""
        model_id = self.model_id
        return model_id == TINY_RANDOM_MODEL_ID or model_id.endswith("/random") or self.model_name == TINY_MODEL

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
