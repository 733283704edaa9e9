"""Remote CLIP on loopback: ``heimdex clip-server`` serves the tiny test model, and a ``ClipEmbedder`` with
``remote_url`` gets the local model id and the local vectors from it, or one-line errors naming the server."""

import base64
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, text

from heimdex_assets.assets import scene_clip_embeddings
from heimdex_assets.assets.scene_clip import decode_size
from heimdex_assets.cli import main
from heimdex_assets.db.tables import scene_clip_vectors
from heimdex_assets.resources import ClipEmbedder
from heimdex_assets.resources.blob_store import decode_image
from heimdex_assets.resources.clip_embedder import TINY_MODEL
from heimdex_assets.resources.clip_server import ClipServer, ClipServerUnavailableError, decode_vectors, serve
from heimdex_assets.settings import clip_from_env
from heimdex_assets_tests.conftest import materialize_videos, render_thumbnail

TOKEN = "test-token-7f3a9c"
TEXTS = ["a boat at dawn", "two people on a pier", ""]


@pytest.fixture
def start_server(clip) -> Iterator:
    """Starts a server of the tiny test CLIP on 127.0.0.1 and a free port; stops it after the test."""
    servers: list[ClipServer] = []

    def start(**kwargs) -> ClipServer:
        server = serve(clip, "127.0.0.1", 0, kwargs.pop("token", None), kwargs.pop("max_body_bytes", 64 << 20))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def thumbnails(tmp_path: Path, n: int = 5) -> list[Image.Image]:
    paths = [tmp_path / f"thumb-{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        render_thumbnail(path, seed=100 + i)
    return [decode_image(p.read_bytes(), str(p)) for p in paths]


def jpeg(width: int = 1280, height: int = 720) -> bytes:
    """A large photo-like JPEG: decoded at a reduced scale (``Image.draft``) for a 224 px model."""
    rng = np.random.default_rng(3)
    pixels = (np.linspace(0, 255, width)[None, :, None] + rng.normal(0, 20, (height, width, 3))).clip(0, 255)
    buffer = BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def post(server: ClipServer, path: str, body: object, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_one_line(exc: BaseException, *, names: str) -> str:
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    assert names in message
    return message


def test_remote_gives_the_local_model_id_and_vectors(clip, start_server, tmp_path):
    server = start_server()
    remote = ClipEmbedder(remote_url=server.url)
    images = thumbnails(tmp_path)

    assert remote.model_id == clip.model_id and remote.model_id.startswith("open_clip:heimdex-tiny@sha256:")
    assert remote.dimension == clip.dimension
    assert remote.input_size == clip.input_size and decode_size(remote) == decode_size(clip)
    assert remote.is_placeholder == clip.is_placeholder
    assert (remote.device_kind, remote.batch_size) == ("cpu", clip.batch_size)

    local_vectors = clip.embed_images(images)
    np.testing.assert_allclose(remote.embed_images(images), local_vectors, atol=1e-5)
    # The assets' path: preprocess on decoding threads, then embed_tensors per batch.
    np.testing.assert_allclose(remote.embed_tensors([remote.preprocess(i) for i in images]), local_vectors, atol=1e-5)
    np.testing.assert_allclose(remote.embed_texts(TEXTS), clip.embed_texts(TEXTS), atol=1e-5)
    assert remote.embed_tensors([]).shape == (0, clip.dimension)
    assert remote._clip is None  # nothing was loaded on the client side


def test_an_image_file_is_decoded_server_side_as_a_local_thumbnail_is(clip, start_server):
    server = start_server()
    data = jpeg()
    local = clip.embed_tensors([clip.preprocess(decode_image(data, "photo.jpg", decode_size(clip)))])

    response = post(server, "/v1/embed-images", {"images": [b64(data)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_id"], body["dimension"], body["count"]) == (clip.model_id, clip.dimension, 1)
    np.testing.assert_allclose(decode_vectors(body["vectors"]), local, atol=1e-5)
    # The reduced-scale decode matters: at full size the vector differs, so the server decoded as locally.
    full = clip.embed_tensors([clip.preprocess(decode_image(data, "photo.jpg"))])
    assert not np.allclose(full, local, atol=1e-5)

    texts = post(server, "/v1/embed-texts", {"texts": TEXTS}).json()
    np.testing.assert_allclose(decode_vectors(texts["vectors"]), clip.embed_texts(TEXTS), atol=1e-5)


def test_a_corrupt_image_is_refused_naming_its_index(start_server, tmp_path):
    server = start_server()
    good = ClipEmbedder(remote_url=server.url).preprocess(thumbnails(tmp_path, 1)[0])

    response = post(server, "/v1/embed-images", {"images": [b64(good), b64(b"\x89PNG\r\n\x1a\n not a png")]})
    assert response.status_code == 400
    body = response.json()
    assert body["index"] == 1 and "images[1]" in body["error"] and "not a readable image" in body["error"]

    for bad, why in (([b64(good), "%%%"], "images[1] is not valid base64"), ([7], "images[0] is not a base64")):
        response = post(server, "/v1/embed-images", {"images": bad})
        assert response.status_code == 400 and why in response.json()["error"]
    for body, path in (({"texts": ["ok", 3]}, "/v1/embed-texts"), ({"pictures": []}, "/v1/embed-images")):
        response = post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]
    not_json = httpx.post(server.url + "/v1/embed-texts", content=b"{", timeout=30)
    assert (not_json.status_code, not_json.json()) == (400, {"error": "the body is not JSON"})
    assert httpx.get(server.url + "/v2/nothing", timeout=30).status_code == 404
    assert httpx.get(server.url + "/v1/embed-texts", timeout=30).status_code == 405

    with pytest.raises(ClipServerUnavailableError) as failure:
        ClipEmbedder(remote_url=server.url).embed_tensors([good, b"not an image"])
    message = assert_one_line(failure.value, names=server.url)
    assert "400" in message and "images[1]" in message


def test_a_body_over_the_limit_is_refused_and_the_client_splits_its_requests(clip, start_server, tmp_path):
    images = thumbnails(tmp_path, 6)
    largest = max(len(ClipEmbedder(remote_url="http://127.0.0.1:1").preprocess(i)) for i in images)
    server = start_server(max_body_bytes=3 * largest)

    too_big = post(server, "/v1/embed-texts", {"texts": ["x" * (3 * largest)]})
    assert too_big.status_code == 413 and "over the limit" in too_big.json()["error"]

    remote = ClipEmbedder(remote_url=server.url)
    np.testing.assert_allclose(remote.embed_images(images), clip.embed_images(images), atol=1e-5)


def test_a_wrong_token_is_refused(clip, start_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = start_server(token=TOKEN)
    image = thumbnails(tmp_path, 1)

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.get(server.url + "/v1/model", headers=headers, timeout=30)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    # A refused POST still gets its answer (the body is read first, not reset under the client).
    refused = post(server, "/v1/embed-images", {"images": [b64(b"x" * 200_000)]}, token="wrong")
    assert refused.status_code == 401

    with pytest.raises(ClipServerUnavailableError) as failure:
        ClipEmbedder(remote_url=server.url, remote_token="not-the-token").model_id  # noqa: B018
    message = assert_one_line(failure.value, names=server.url)
    assert "401" in message and "HEIMDEX_CLIP_SERVER_TOKEN" in message and "not-the-token" not in message

    remote = ClipEmbedder(remote_url=server.url, remote_token=TOKEN)
    np.testing.assert_allclose(remote.embed_images(image), clip.embed_images(image), atol=1e-5)
    assert caplog.records and TOKEN not in caplog.text and "not-the-token" not in caplog.text


def test_settings_read_the_url_and_keep_the_token_an_env_var(clip, start_server, monkeypatch):
    server = start_server(token=TOKEN)
    monkeypatch.setenv("HEIMDEX_CLIP_URL", server.url)
    monkeypatch.setenv("HEIMDEX_CLIP_SERVER_TOKEN", TOKEN)

    remote = clip_from_env()
    assert remote.remote_url == server.url
    assert (
        isinstance(remote.remote_token, dg.EnvVar) and remote.remote_token.env_var_name == "HEIMDEX_CLIP_SERVER_TOKEN"
    )
    assert remote.model_id == clip.model_id
    np.testing.assert_allclose(remote.embed_texts(TEXTS), clip.embed_texts(TEXTS), atol=1e-5)

    monkeypatch.delenv("HEIMDEX_CLIP_URL")
    monkeypatch.delenv("HEIMDEX_CLIP_SERVER_TOKEN")
    assert (clip_from_env().remote_url, clip_from_env().remote_token) == (None, None)


def test_a_server_that_is_down_is_one_line_naming_it_without_credentials(start_server):
    server = start_server()
    port = server.server_address[1]
    server.shutdown()
    server.server_close()

    remote = ClipEmbedder(remote_url=f"http://someone:hunter2@127.0.0.1:{port}/", remote_retries=1)
    for call in (remote.ensure_loaded, lambda: remote.model_id, lambda: remote.embed_texts(["x"])):
        with pytest.raises(ClipServerUnavailableError) as failure:
            call()
        message = assert_one_line(failure.value, names=f"http://127.0.0.1:{port}")
        assert "unreachable" in message and "2 attempt(s)" in message
        assert "hunter2" not in message and "someone" not in message

    with pytest.raises(ClipServerUnavailableError) as failure:
        ClipEmbedder(remote_url="127.0.0.1:8765").model_id  # noqa: B018
    assert_one_line(failure.value, names="not an http(s) URL")


def test_scene_clip_rows_from_the_remote_embedder_equal_the_local_ones(
    db, rows, resources, instance, clip, start_server
):
    server = start_server()
    video = str(rows.video(rows.owner(), n_scenes=4))

    def clip_rows():
        with db.engine.connect() as conn:
            query = select(scene_clip_vectors).order_by(scene_clip_vectors.c.scene_id)
            return [r._asdict() for r in conn.execute(query)]

    materialize_videos([scene_clip_embeddings], [video], resources, instance)
    local = clip_rows()
    with db.transaction() as conn:
        conn.execute(text("TRUNCATE scene_clip_vectors"))
    remote = resources | {"clip": ClipEmbedder(remote_url=server.url)}
    materialize_videos([scene_clip_embeddings], [video], remote, instance)
    served = clip_rows()

    assert len(local) == len(served) == 4
    for a, b in zip(local, served, strict=True):
        assert {k: v for k, v in a.items() if k not in ("embedding", "created_at")} == {
            k: v for k, v in b.items() if k not in ("embedding", "created_at")
        }
        assert b["model_id"] == clip.model_id
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_serves_until_interrupted_and_reports_a_busy_port(clip, tiny_clip_checkpoint, monkeypatch, capsys):
    env = os.environ | {
        "HEIMDEX_CLIP_MODEL": TINY_MODEL,
        "HEIMDEX_CLIP_CHECKPOINT": str(tiny_clip_checkpoint),
        "HEIMDEX_CLIP_DEVICE": "cpu",
        "HEIMDEX_CLIP_URL": "http://127.0.0.1:1",  # ignored by the server: it embeds with the local model
        "HEIMDEX_CLIP_SERVER_TOKEN": TOKEN,
    }
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "heimdex_assets.cli", "clip-server", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()
        assert f"{clip.model_id} on cpu at http://127.0.0.1:{port}" in banner, process.stderr.read()
        assert TOKEN not in banner
        remote = ClipEmbedder(remote_url=f"http://127.0.0.1:{port}", remote_token=TOKEN)
        np.testing.assert_allclose(remote.embed_texts(TEXTS), clip.embed_texts(TEXTS), atol=1e-5)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "heimdex clip-server: stopped" in out and TOKEN not in out + err

    for name in ("HEIMDEX_CLIP_MODEL", "HEIMDEX_CLIP_CHECKPOINT", "HEIMDEX_CLIP_DEVICE"):
        monkeypatch.setenv(name, env[name])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        code = main(["clip-server", "--port", str(taken)])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"heimdex: error: cannot listen on 127.0.0.1:{taken}"), err
