"""ClipEmbedder: the model id is pure configuration, and configured weights load or fail loudly.

No database here: only the tiny checkpoint file from conftest and the seeded ``tiny-random`` model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heimdex_assets.resources import ClipEmbedder, clip_embedder
from heimdex_assets.resources.clip_embedder import (
    TINY_MODEL,
    TINY_RANDOM_MODEL,
    TINY_RANDOM_MODEL_ID,
    ClipWeightsUnavailableError,
    file_sha256,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def image(seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def other_checkpoint(source: Path, target: Path) -> Path:
    """A valid checkpoint for the same architecture, with different weights (so different bytes)."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state}, target)
    return target


def assert_one_line_error(exc: ClipWeightsUnavailableError) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    assert "HEIMDEX_CLIP_CHECKPOINT" in message and "tiny-random" in message
    return message


PROBE = """
import json, sys
from heimdex_assets.resources.clip_embedder import ClipEmbedder
out = [[ClipEmbedder(**cfg).model_id, ClipEmbedder(**cfg).is_placeholder] for cfg in json.loads(sys.argv[1])]
assert "torch" not in sys.modules, "model_id imported torch"
assert "open_clip" not in sys.modules, "model_id imported open_clip"
print(json.dumps(out))
"""


def model_ids_without_torch(configs: list[dict]) -> list[list]:
    """(model_id, is_placeholder) per configuration, computed in a fresh process that must not import torch."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(configs)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_model_id_and_placeholder_come_from_configuration_alone(tiny_clip_checkpoint):
    digest = file_sha256(tiny_clip_checkpoint)[:16]
    configs = [
        {},
        {"model_name": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"},
        {"model_name": "ViT-B-32", "pretrained": None},
        {"model_name": TINY_MODEL, "checkpoint_path": str(tiny_clip_checkpoint)},
        {"model_name": "ViT-B-32", "pretrained": None, "checkpoint_path": str(tiny_clip_checkpoint)},
        {"model_name": TINY_RANDOM_MODEL},
        {"model_name": TINY_RANDOM_MODEL, "pretrained": "openai", "checkpoint_path": str(tiny_clip_checkpoint)},
    ]
    assert model_ids_without_torch(configs) == [
        ["open_clip:ViT-B-32/openai", False],
        ["open_clip:ViT-B-16/laion2b_s34b_b88k", False],
        ["open_clip:ViT-B-32/random", True],
        [f"open_clip:{TINY_MODEL}@sha256:{digest}", True],
        [f"open_clip:ViT-B-32@sha256:{digest}", False],
        [TINY_RANDOM_MODEL_ID, True],
        [TINY_RANDOM_MODEL_ID, True],
    ]


def test_checkpoint_id_is_the_id_of_the_loaded_model(tiny_clip_checkpoint):
    embedder = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(tiny_clip_checkpoint), device="cpu")
    before = embedder.model_id
    assert before == f"open_clip:{TINY_MODEL}@sha256:{file_sha256(tiny_clip_checkpoint)[:16]}"
    vectors = embedder.embed_images([image()])
    assert vectors.shape == (1, embedder.dimension)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.model_id == before == embedder._loaded().model_id


def test_checkpoint_id_follows_the_file_bytes(tiny_clip_checkpoint, tmp_path):
    other = other_checkpoint(tiny_clip_checkpoint, tmp_path / "other.pt")
    first = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(tiny_clip_checkpoint), device="cpu")
    second = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(other), device="cpu")
    assert first.model_id != second.model_id
    assert second.model_id == f"open_clip:{TINY_MODEL}@sha256:{file_sha256(other)[:16]}"
    assert not np.allclose(first.embed_images([image()]), second.embed_images([image()]))
    assert second._loaded().model_id == second.model_id

    # New bytes under the same path: a new id, and the model behind it is reloaded to match.
    moving = tmp_path / "moving.pt"
    moving.write_bytes(tiny_clip_checkpoint.read_bytes())
    embedder = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(moving), device="cpu")
    old_id, old_vector = embedder.model_id, embedder.embed_images([image()])
    assert old_id == first.model_id
    moving.write_bytes(other.read_bytes())
    stat = moving.stat()
    os.utime(moving, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert embedder.model_id == second.model_id != old_id
    new_vector = embedder.embed_images([image()])
    assert embedder._loaded().model_id == embedder.model_id
    assert np.allclose(new_vector, second.embed_images([image()]), atol=1e-6)
    assert not np.allclose(new_vector, old_vector)


def test_checkpoint_is_hashed_once_per_file_version(tiny_clip_checkpoint, monkeypatch):
    calls = []
    real = clip_embedder.file_sha256
    monkeypatch.setattr(clip_embedder, "_CHECKPOINT_SHA256", {})
    monkeypatch.setattr(clip_embedder, "file_sha256", lambda path: calls.append(path) or real(path))
    embedder = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(tiny_clip_checkpoint))
    twin = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(tiny_clip_checkpoint))
    ids = {embedder.model_id for _ in range(3)} | {twin.model_id}
    assert len(ids) == 1 and len(calls) == 1


def test_unavailable_hub_weights_raise_one_clear_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    empty = tmp_path / "empty-cache"
    for name in ("HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(empty))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(name, str(empty / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub client reads these at import; its module globals are what calls consult.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    embedder = ClipEmbedder(model_name="ViT-B-32", pretrained="openai", device="cpu")
    assert embedder.model_id == "open_clip:ViT-B-32/openai" and not embedder.is_placeholder
    with pytest.raises(ClipWeightsUnavailableError) as failure:
        embedder.ensure_loaded()
    message = assert_one_line_error(failure.value)
    assert "ViT-B-32/openai" in message
    assert failure.value.__cause__ is None and failure.value.__suppress_context__
    # No silent random fallback: nothing loaded, and every use fails the same way.
    assert ("ViT-B-32", "openai", None, "cpu") not in clip_embedder._LOADED
    with pytest.raises(ClipWeightsUnavailableError):
        embedder.embed_images([image()])
    assert embedder.model_id == "open_clip:ViT-B-32/openai"


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no-such-clip.pt"
    embedder = ClipEmbedder(model_name="ViT-B-32", checkpoint_path=str(missing), device="cpu")
    for attempt in (lambda: embedder.model_id, embedder.ensure_loaded):
        with pytest.raises(ClipWeightsUnavailableError) as failure:
            attempt()
        message = assert_one_line_error(failure.value)
        assert str(missing) in message and "not found" in message


def test_bad_checkpoint_raises_one_clear_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint\n" * 64)
    embedder = ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(bad), device="cpu")
    assert embedder.model_id.startswith(f"open_clip:{TINY_MODEL}@sha256:")  # an id needs only the bytes
    with pytest.raises(ClipWeightsUnavailableError) as failure:
        embedder.ensure_loaded()
    assert str(bad) in assert_one_line_error(failure.value)


def test_tiny_random_is_a_seeded_placeholder(monkeypatch):
    import torch

    rng_before = torch.get_rng_state()
    first = ClipEmbedder(model_name=TINY_RANDOM_MODEL, device="cpu")
    first.ensure_loaded()
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding leaves the caller's RNG alone
    a = first.embed_images([image()])
    # A fresh process-wide cache: the second instance builds the model again, from the same seed.
    monkeypatch.setattr(clip_embedder, "_LOADED", {})
    second = ClipEmbedder(model_name=TINY_RANDOM_MODEL, device="cpu")
    b = second.embed_images([image()])
    assert second._loaded() is not first._loaded()
    assert a.shape == (1, first.dimension) and np.array_equal(a, b)
    for embedder in (first, second):
        assert embedder.model_id == TINY_RANDOM_MODEL_ID == "open_clip:tiny-random"
        assert embedder.is_placeholder
    assert first.embed_texts(["a boat"]).shape == (1, first.dimension)


def test_settings_read_the_model_and_ignore_a_leftover_fallback(monkeypatch, tiny_clip_checkpoint):
    from heimdex_assets.settings import clip_from_env

    for name in ("HEIMDEX_CLIP_PRETRAINED", "HEIMDEX_CLIP_CHECKPOINT", "HEIMDEX_CLIP_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEIMDEX_CLIP_FALLBACK", "none")
    monkeypatch.setenv("HEIMDEX_CLIP_MODEL", TINY_RANDOM_MODEL)
    assert clip_from_env().model_id == TINY_RANDOM_MODEL_ID and clip_from_env().is_placeholder

    monkeypatch.setenv("HEIMDEX_CLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("HEIMDEX_CLIP_CHECKPOINT", str(tiny_clip_checkpoint))
    monkeypatch.setenv("HEIMDEX_CLIP_DEVICE", "cpu")
    clip = clip_from_env()
    assert (clip.model_name, clip.checkpoint_path, clip.device) == (TINY_MODEL, str(tiny_clip_checkpoint), "cpu")
    assert clip.model_id == f"open_clip:{TINY_MODEL}@sha256:{file_sha256(tiny_clip_checkpoint)[:16]}"


@pytest.mark.parametrize("model_name", [TINY_RANDOM_MODEL, "heimdex-zero-cost"])
def test_uint8_preprocessing_gives_open_clips_exact_input_and_vectors(model_name):
    """preprocess hands over resized bytes and embed_tensors normalises them per batch: the same floats as
    open_clip's own transform, so the same vectors (mixed inputs too)."""
    import torch

    clip = ClipEmbedder(model_name=model_name, pretrained=None, device="cpu")
    loaded = clip._loaded()
    images = [image(seed) for seed in range(3)] + [image(9).resize((300, 120)), image(4).convert("L")]
    fast = [clip.preprocess(im) for im in images]
    assert all(t.dtype == torch.uint8 and t.shape[-1] == 3 for t in fast)
    reference = torch.stack([loaded.transform(im.convert("RGB")) for im in images])
    assert torch.equal(loaded.fast.to_model_input(torch.stack(fast), "cpu"), reference)
    expected = clip.embed_tensors(list(reference))
    assert np.array_equal(clip.embed_tensors(fast), expected)
    assert np.array_equal(clip.embed_tensors([fast[0], reference[1], *fast[2:]]), expected)
    assert np.array_equal(clip.embed_images(images), expected)


def test_batch_size_and_decode_workers_follow_the_device():
    """CPU keeps today's batch of 32 (4 decode threads); configuration overrides; auto is CPU without a GPU."""
    import torch

    cpu = ClipEmbedder(model_name=TINY_RANDOM_MODEL, device="cpu")
    assert (cpu.device_kind, cpu.batch_size, cpu.workers) == ("cpu", 32, 4)
    set_ = ClipEmbedder(model_name=TINY_RANDOM_MODEL, device="cpu", images_per_batch=5, decode_workers=2)
    assert (set_.batch_size, set_.workers) == (5, 2)
    assert clip_embedder.DEVICE_DEFAULTS["cuda"] == {"batch_size": 256, "decode_workers": 8}
    auto = ClipEmbedder(model_name=TINY_RANDOM_MODEL, device="auto")
    assert auto.device_kind == ("cuda" if torch.cuda.is_available() else "cpu")
    # Batches of 5 give the vectors of one batch of all.
    images = [image(seed) for seed in range(12)]
    assert np.allclose(set_.embed_images(images), cpu.embed_images(images), atol=1e-6)


def test_jpeg_decodes_reduced_to_what_the_model_needs_and_png_whole(tmp_path):
    import io

    from heimdex_assets.resources.blob_store import decode_image

    big = image().resize((1920, 1080))
    jpeg, png = io.BytesIO(), io.BytesIO()
    big.save(jpeg, format="JPEG")
    big.save(png, format="PNG")
    assert decode_image(jpeg.getvalue(), "a.jpg").size == (1920, 1080)
    reduced = decode_image(jpeg.getvalue(), "a.jpg", at_least=(448, 448))
    assert reduced.mode == "RGB" and reduced.size == (960, 540)  # 1/4 would leave 270 px < 448
    assert decode_image(png.getvalue(), "a.png", at_least=(448, 448)).size == (1920, 1080)
