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


# Per device kind: images per model batch and threads reading and decoding thumbnails ahead of the model.
# CPU: today's batch (the model is the bottleneck); CUDA: batches that keep the GPU busy, and enough decoders to
# feed it (untested on a GPU here).
DEVICE_DEFAULTS = {"cpu": {"batch_size": 32, "decode_workers": 4}, "cuda": {"batch_size": 256, "decode_workers": 8}}


class FastPreprocess:
    """open_clip's evaluation transform (Resize of the short side, bicubic → CenterCrop → RGB → to tensor →
    Normalize), split in two: per image, the PIL part to a uint8 (H, W, 3) tensor (in worker threads: PIL
    releases the GIL); per batch, ``to_model_input`` scales and normalises the stacked bytes in one vectorised
    operation, on the model's device (stacking contiguous channels-last bytes is a plain copy). The same
    arithmetic as ``ToTensor`` then ``Normalize`` (x / 255, - mean, / std) on the same contiguous layout, so
    the same floats and vectors, at a quarter of the bytes per image and without four tensor operations each.

    ``from_transform`` returns None for any other transform: the caller keeps the original."""

    def __init__(self, size: int, interpolation: Any, crop: tuple[int, int], mean: Any, std: Any) -> None:
        self.size, self.interpolation, self.crop = size, interpolation, crop
        self.mean, self.std = mean, std

    @classmethod
    def from_transform(cls, transform: Any) -> FastPreprocess | None:
        from open_clip.transform import MaybeConvertMode, MaybeToTensor
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        kinds = [type(t) for t in steps]
        if kinds != [T.Resize, T.CenterCrop, MaybeConvertMode, MaybeToTensor, T.Normalize]:
            return None
        resize, crop, mode, _, normalize = steps
        if not isinstance(resize.size, int) or resize.max_size is not None or mode.mode != "RGB":
            return None
        if normalize.inplace:
            return None
        size = crop.size if isinstance(crop.size, tuple) else (crop.size, crop.size)
        return cls(resize.size, resize.interpolation, tuple(size), normalize.mean, normalize.std)

    def __call__(self, image: Image.Image) -> Any:
        """The image resized and cropped as the model expects, as a uint8 (H, W, 3) tensor."""
        import torch
        from torchvision.transforms import functional as F

        image = image if image.mode == "RGB" else image.convert("RGB")
        image = F.center_crop(F.resize(image, self.size, self.interpolation), list(self.crop))
        return torch.from_numpy(np.array(image))

    def to_model_input(self, batch: Any, device: str) -> Any:
        """Stacked uint8 images (N, H, W, 3) → the normalised float32 input (N, 3, H, W) on ``device``."""
        import torch

        # Contiguous NCHW, as open_clip's transform gives: a channels-last input takes other conv kernels,
        # whose rounding would move vectors by ~1e-7 and rewrite equal rows. Reordered while still bytes
        # (4x cheaper than reordering floats).
        x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)


class LoadedClip:
    """A loaded open_clip model with its preprocessing, tokenizer and the id its vectors carry."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, model_id: str, device: str) -> None:
        self.model = model
        self.transform = preprocess  # open_clip's own: float tensors, already normalised
        self.fast = FastPreprocess.from_transform(preprocess)
        self.preprocess = self.fast or preprocess
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

    ``remote_url`` (a ``heimdex clip-server``): every vector is computed there, with the server's model and
    under its model id; the local model settings are then unused and nothing loads here. Failures raise
    ``ClipServerUnavailableError`` (a ``ClipWeightsUnavailableError``), one line naming the server.
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    checkpoint_path: str | None = None
    device: str = "auto"
    images_per_batch: int | None = None  # None: from the device (``DEVICE_DEFAULTS``)
    decode_workers: int | None = None  # threads reading and decoding images ahead; None: from the device
    remote_url: str | None = None  # a `heimdex clip-server`, e.g. http://gpu-host:8765
    remote_token: str | None = None  # its bearer token; a dg.EnvVar keeps it out of run config and snapshots
    remote_timeout_s: float = 120.0  # per request: a batch on a busy CPU server takes a while
    remote_retries: int = 3  # further attempts after a connection failure or a 503, backing off 0.5, 1, 2 s

    _clip: LoadedClip | None = PrivateAttr(default=None)
    _remote: Any = PrivateAttr(default=None)

    def _server(self) -> Any:
        """The ``RemoteClip`` of ``remote_url``, made once per resource instance (it pins the model id)."""
        if self._remote is None:
            from heimdex_assets.resources.clip_server import RemoteClip

            token = self.remote_token
            if isinstance(token, dg.EnvVar):  # outside a run Dagster has not resolved it
                token = token.get_value()
            token = (token or "").strip() or None
            self._remote = RemoteClip(self.remote_url, token, self.remote_timeout_s, self.remote_retries)
        return self._remote

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

        Raises ``ClipWeightsUnavailableError`` with a one-line message saying what to configure. Remote: asks
        the server for its model (so an unreachable server fails up front too).
        """
        if self.remote_url:
            self._server().model()
            return
        self._loaded()

    @property
    def model_id(self) -> str:
        """The id stored with every vector this model makes, from configuration alone: no torch,
        no weights (a checkpoint file is hashed, once per process and file version). Remote: the server's,
        asked once per resource instance."""
        if self.remote_url:
            return self._server().model().model_id
        return clip_model_id(self.model_name, self.pretrained, self.checkpoint_path)

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        if self.remote_url:
            return self._server().model().dimension
        return self._loaded().dimension

    @property
    def device_kind(self) -> str:
        """``cuda`` or ``cpu``: where the model runs (``auto`` picks CUDA when torch sees a GPU; remote: the
        server's device)."""
        if self.remote_url:
            return "cuda" if self._server().model().device.startswith("cuda") else "cpu"
        if self._clip is not None:
            return "cuda" if str(self._clip.device).startswith("cuda") else "cpu"
        return "cuda" if _pick_device(self.device).startswith("cuda") else "cpu"

    @property
    def batch_size(self) -> int:
        """Images per model batch: ``images_per_batch``, else the device's default (CPU 32, CUDA 256; remote:
        the server's batch, so each request fills one)."""
        if self.remote_url and not self.images_per_batch:
            return self._server().model().batch_size
        return self.images_per_batch or DEVICE_DEFAULTS[self.device_kind]["batch_size"]

    @property
    def workers(self) -> int:
        """Threads that read and decode images ahead of the model: ``decode_workers``, else the device's
        default (CPU 4, CUDA 8; remote: CPU's, as decoding stays here)."""
        if self.remote_url:
            return self.decode_workers or DEVICE_DEFAULTS["cpu"]["decode_workers"]
        return self.decode_workers or DEVICE_DEFAULTS[self.device_kind]["decode_workers"]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (width, height) the model's preprocessing resizes to, when known: decoders may stop at twice that."""
        if self.remote_url:
            return self._server().model().input_size
        fast = self._loaded().fast
        return (fast.size, fast.size) if fast is not None else None

    @property
    def is_placeholder(self) -> bool:
        """True for random weights (``tiny-random``, the ``heimdex-tiny`` test architecture, no
        pretrained weights): fine for image-to-image plumbing, meaningless for text-to-image ranking.
        From configuration alone (remote: the server's configuration)."""
        if self.remote_url:
            return self._server().model().placeholder
        if self.model_name in (TINY_RANDOM_MODEL, TINY_MODEL):
            return True
        return not self.checkpoint_path and not self.pretrained

    def preprocess(self, image: Image.Image) -> Any:
        """The model's input for one image, for ``embed_tensors`` (CPU; safe to call from worker threads):
        a uint8 (H, W, 3) tensor resized and cropped, normalised later per batch (open_clip's normalised
        float (3, H, W) tensor when its transform is not the usual one). Remote: the image as PNG (lossless:
        the server preprocesses the very pixels decoded here)."""
        if self.remote_url:
            from heimdex_assets.resources.clip_server import encode_image

            return encode_image(image)
        return self._loaded().preprocess(image if image.mode == "RGB" else image.convert("RGB"))

    def _model_input(self, clip: LoadedClip, tensors: list[Any]) -> Any:
        import torch

        if clip.fast is not None and all(t.dtype == torch.uint8 for t in tensors):
            batch = torch.stack(tensors)
            if str(clip.device).startswith("cuda"):
                batch = batch.pin_memory()  # an asynchronous copy to the GPU
            return clip.fast.to_model_input(batch, clip.device)
        floats = [clip.fast.to_model_input(t[None], "cpu")[0] if t.dtype == torch.uint8 else t for t in tensors]
        return torch.stack(floats).to(clip.device)

    def embed_tensors(self, tensors: list[Any]) -> np.ndarray:
        """Unit vectors for preprocessed images, in batches of ``batch_size``. On CUDA the model runs under
        fp16 autocast (vectors within about 1e-3 of fp32); on CPU in fp32. Remote: ``preprocess``'s PNGs
        (or PIL images), embedded by the server."""
        if self.remote_url:
            return self._embed_remote(tensors)
        import torch

        clip = self._loaded()
        cuda = str(clip.device).startswith("cuda")
        out = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            for start in range(0, len(tensors), self.batch_size):
                batch = self._model_input(clip, tensors[start : start + self.batch_size])
                feats = clip.model.encode_image(batch).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, clip.dimension), dtype=np.float32)

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Unit CLIP vectors of ``images``, one row per image."""
        if self.remote_url:
            return self._embed_remote(images)
        return self.embed_tensors([self.preprocess(img) for img in images])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit CLIP text vectors (for text-to-image search)."""
        if self.remote_url:
            return self._server().embed_texts(texts)
        import torch

        clip = self._loaded()
        cuda = str(clip.device).startswith("cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            tokens = clip.tokenizer(texts).to(clip.device)
            feats = clip.model.encode_text(tokens).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def _embed_remote(self, images: list[Any]) -> np.ndarray:
        from heimdex_assets.resources.clip_server import encode_image

        files = []
        for index, image in enumerate(images):
            if isinstance(image, Image.Image):
                image = encode_image(image)
            if not isinstance(image, bytes):
                raise TypeError(f"image {index}: a remote CLIP takes PIL images or preprocess()'s bytes")
            files.append(image)
        return self._server().embed_images(files)
