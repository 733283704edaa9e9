"""Remote CLIP: ``heimdex clip-server`` keeps one model loaded (on a GPU host, say) and serves the
``ClipEmbedder`` interface over HTTP; a ``ClipEmbedder`` with ``remote_url`` calls it through ``RemoteClip``.

Protocol (JSON both ways; with a token set, every request needs ``Authorization: Bearer <token>``):

- ``GET /v1/model`` → ``{"model_id", "dimension", "input_size", "placeholder", "device", "batch_size",
  "max_body_bytes"}``
- ``POST /v1/embed-images`` ``{"images": [base64 of an image file, ...]}`` → ``{"model_id", "dimension",
  "count", "vectors": {"dtype": "<f4", "shape": [n, d], "data": base64}}``. Images are decoded as local
  thumbnails are (``blob_store.decode_image``) and preprocessed and embedded by the same code, so the
  vectors are the local ones.
- ``POST /v1/embed-texts`` ``{"texts": ["...", ...]}`` → the same shape.

Errors are ``{"error": "<one line>"}`` (plus ``"index"`` for the item at fault) with 400 (malformed
request, unreadable image), 401 (token), 404, 405, 411, 413 (body over the limit), 500 or 503.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from heimdex_assets.resources.blob_store import BlobError, decode_image
from heimdex_assets.resources.clip_embedder import ClipEmbedder, ClipWeightsUnavailableError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
TOKEN_ENV = "HEIMDEX_CLIP_SERVER_TOKEN"
URL_ENV = "HEIMDEX_CLIP_URL"
DRAIN_S = 5.0  # longest a refused request's body is read and discarded so that the refusal arrives
VECTOR_DTYPE = "<f4"  # little-endian float32: the model's own floats, exactly, whatever either host's byte order


class ClipServerUnavailableError(ClipWeightsUnavailableError):
    """The CLIP server could not be reached, refused the request or answered nonsense. One line, naming the
    server without credentials; a ``ClipWeightsUnavailableError``, so the CLI, API and demo report it as such."""


def safe_url(url: str) -> str:
    """``url`` without user, password, query or fragment: fit for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def encode_vectors(vectors: np.ndarray) -> dict[str, Any]:
    """The wire form of a (n, d) float32 array: exact, and a third of the size of JSON numbers."""
    array = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE)
    return {"dtype": VECTOR_DTYPE, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_vectors(wire: Any) -> np.ndarray:
    """``encode_vectors`` undone, as a writable native float32 array; ValueError when it is malformed."""
    if not isinstance(wire, dict) or wire.get("dtype") != VECTOR_DTYPE:
        raise ValueError("vectors are not little-endian float32")
    shape = wire.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ValueError("vectors have no (n, d) shape")
    try:
        data = base64.b64decode(wire.get("data", ""), validate=True)
    except (binascii.Error, TypeError):
        raise ValueError("vectors are not base64") from None
    if len(data) != 4 * shape[0] * shape[1]:
        raise ValueError(f"vectors hold {len(data)} bytes, not {shape[0]}x{shape[1]} float32")
    return np.frombuffer(data, dtype=VECTOR_DTYPE).reshape(shape).astype(np.float32)


def encode_image(image: Image.Image) -> bytes:
    """A decoded image as PNG: lossless, so the server decodes the very pixels the caller holds (and makes
    the local vectors). Low compression: the bytes cross a network once, the CPU time is spent per image."""
    buffer = BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --- server -------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request we refuse: its HTTP status and a one-line reason (``index``: the item at fault)."""

    def __init__(self, status: int, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.index = status, message, index


def is_loopback(host: str) -> bool:
    """Whether ``host`` only takes connections from this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ClipServer(ThreadingHTTPServer):
    """Serves one loaded ``ClipEmbedder`` (loaded here, before the port opens: a bad model fails at start).

    ``token``: the bearer token every request must carry (None: no authentication, fine on loopback).
    Images are decoded on ``clip.workers`` threads; the model runs one request at a time (its own batches
    already fill the device, and concurrent CPU inference would only fight over the cores)."""

    daemon_threads = True

    def __init__(
        self,
        clip: ClipEmbedder,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if clip.remote_url:
            raise ValueError("a CLIP server embeds with a local model: its ClipEmbedder has no remote_url")
        clip.ensure_loaded()
        self.clip = clip
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.model_lock = threading.Lock()
        self.decoders = ThreadPoolExecutor(max_workers=clip.workers, thread_name_prefix="clip-decode")
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        """Where clients reach it, with the port actually bound (port 0 picks one)."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        """The ``GET /v1/model`` answer."""
        clip = self.clip
        return {
            "model_id": clip.model_id,
            "dimension": clip.dimension,
            "input_size": list(clip.input_size) if clip.input_size else None,
            "placeholder": clip.is_placeholder,
            "device": clip.device_kind,
            "batch_size": clip.batch_size,
            "max_body_bytes": self.max_body_bytes,
        }

    def embed(self, compute: Any) -> dict[str, Any]:
        """``compute()``'s vectors with the id of the model that made them. The id is read on both sides of
        the computation: a checkpoint replaced in between answers 503 (retry) rather than a mislabelled vector."""
        with self.model_lock:
            before = self.clip.model_id
            vectors = compute()
            if self.clip.model_id != before:
                raise RequestError(503, "the CLIP checkpoint changed while embedding; retry")
        dimension, count = int(vectors.shape[1]), len(vectors)
        return {"model_id": before, "dimension": dimension, "count": count, "vectors": encode_vectors(vectors)}

    def embed_images(self, payload: Any) -> dict[str, Any]:
        items = _list_field(payload, "images", "base64 image file")
        size = self.clip.input_size
        # As scene_clip.decode_size: a JPEG may decode at a reduced scale down to twice the model's input.
        at_least = (2 * size[0], 2 * size[1]) if size else None

        def prepare(index: int, item: Any) -> Any:
            if not isinstance(item, str):
                raise RequestError(400, f"images[{index}] is not a base64 string", index)
            try:
                data = base64.b64decode(item, validate=True)
            except binascii.Error:
                raise RequestError(400, f"images[{index}] is not valid base64", index) from None
            try:
                image = decode_image(data, f"images[{index}]", at_least)
            except BlobError as exc:
                raise RequestError(400, str(exc), index) from None
            return self.clip.preprocess(image)

        tensors = list(self.decoders.map(prepare, range(len(items)), items))  # raises the first bad index's error
        return self.embed(lambda: self.clip.embed_tensors(tensors))

    def embed_texts(self, payload: Any) -> dict[str, Any]:
        texts = _list_field(payload, "texts", "string")
        for index, value in enumerate(texts):
            if not isinstance(value, str):
                raise RequestError(400, f"texts[{index}] is not a string", index)
        if not texts:  # the tokenizer wants at least one text
            return self.embed(lambda: np.zeros((0, self.clip.dimension), dtype=np.float32))
        return self.embed(lambda: self.clip.embed_texts(texts))

    def server_close(self) -> None:
        super().server_close()
        self.decoders.shutdown(wait=False, cancel_futures=True)


def _list_field(payload: Any, key: str, what: str) -> list:
    if not isinstance(payload, dict) or not isinstance(payload.get(key), list):
        raise RequestError(400, f'expected a JSON object {{"{key}": [{what}, ...]}}')
    return payload[key]


ROUTES = {
    "/v1/model": ("GET", lambda server, _: server.info()),
    "/v1/embed-images": ("POST", ClipServer.embed_images),
    "/v1/embed-texts": ("POST", ClipServer.embed_texts),
}


class _Handler(BaseHTTPRequestHandler):
    server: ClipServer
    protocol_version = "HTTP/1.1"  # keep-alive: a client sends batch after batch on one connection
    server_version = "heimdex-clip-server"
    sys_version = ""
    timeout = 120  # seconds a connection may stall mid-request before its thread lets go

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._body_read = method != "POST"
        try:
            if not self._authorised():
                raise RequestError(401, "missing or wrong bearer token")
            path = urlsplit(self.path).path
            if path not in ROUTES:
                raise RequestError(404, f"no such endpoint {path}; see GET /v1/model")
            allowed, handler = ROUTES[path]
            if method != allowed:
                raise RequestError(405, f"{path} takes {allowed}")
            payload = self._read_json() if method == "POST" else None
            self._send(200, handler(self.server, payload))
        except RequestError as exc:
            body = {"error": exc.message} | ({"index": exc.index} if exc.index is not None else {})
            self._send(exc.status, body)
        except Exception as exc:  # one line to the client; the traceback stays in the server's log
            log.exception("%s %s failed", method, urlsplit(self.path).path)
            self._send(500, {"error": f"internal error ({type(exc).__name__}); see the server's log"})

    def _authorised(self) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        # Constant time: the comparison does not tell a caller how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "a Content-Length is required") from None
        if length < 0:
            raise RequestError(400, "negative Content-Length")
        if length > self.server.max_body_bytes:
            raise RequestError(
                413, f"body of {length} bytes is over the limit of {self.server.max_body_bytes}; send fewer items"
            )
        body = self.rfile.read(length)
        self._body_read = True
        if len(body) != length:
            self.close_connection = True
            raise RequestError(400, "the body ended before its Content-Length")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError(400, "the body is not JSON") from None

    def _drain(self) -> None:
        """Discard an unread body (for at most ``DRAIN_S``) before answering: a client still sending gets the
        answer, where closing on unread bytes would reset the connection and lose it. Then close."""
        self.close_connection = True
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if self.headers.get("Transfer-Encoding"):
            return
        deadline = time.monotonic() + DRAIN_S
        try:
            while length > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(length, 1 << 20))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:
            return

    def _send(self, status: int, body: dict[str, Any]) -> None:
        if not self._body_read:
            self._drain()
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="heimdex-clip"')
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Method, path and status only: no headers (the token) and no query string.
        log.info("%s %s %s -> %s", self.address_string(), self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def serve(clip: ClipEmbedder, host: str, port: int, token: str | None, max_body_bytes: int) -> ClipServer:
    """A started server on a background thread (``shutdown()`` then ``server_close()`` to stop it)."""
    server = ClipServer(clip, host, port, token=token, max_body_bytes=max_body_bytes)
    threading.Thread(target=server.serve_forever, name="clip-server", daemon=True).start()
    return server


# --- client -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerModel:
    """What ``GET /v1/model`` said."""

    model_id: str
    dimension: int
    input_size: tuple[int, int] | None
    placeholder: bool
    device: str
    batch_size: int
    max_body_bytes: int


# Errors after which the same request is tried again: nothing was computed, or the answer was lost.
RETRIED_AFTER = ("ConnectError", "ConnectTimeout", "RemoteProtocolError", "ReadError", "WriteError")


class RemoteClip:
    """The client of a CLIP server: retries connection failures and 503 (backing off), pins the model id
    first reported, and refuses vectors made by another model (the server was restarted with new weights),
    so that rows never carry an id that is not their model's."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 120.0, retries: int = 3) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.where = safe_url(url)
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ClipServerUnavailableError(f"CLIP server URL {self.where!r} is not an http(s) URL; fix {URL_ENV}")
        self.retries = max(0, retries)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
        self._model: ServerModel | None = None

    def model(self) -> ServerModel:
        """The server's model, asked once (``GET /v1/model``) and then pinned."""
        if self._model is None:
            self._model = self._parse_model(self._request("GET", "/v1/model"))
        return self._model

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        """Vectors of encoded image files, one row each, in requests within the server's body limit."""
        model = self.model()
        budget = int(model.max_body_bytes * 0.95) - 64  # the JSON around the items
        vectors, chunk, size = [], [], 0
        for index, data in enumerate(images):
            cost = 4 * ((len(data) + 2) // 3) + 4  # base64 plus quotes and a comma
            if cost > budget:
                raise ClipServerUnavailableError(
                    f"image {index} ({len(data)} bytes) is over the body limit of the CLIP server {self.where}"
                )
            if chunk and size + cost > budget:
                vectors.append(self._embed("/v1/embed-images", {"images": chunk}))
                chunk, size = [], 0
            chunk.append(base64.b64encode(data).decode())
            size += cost
        if chunk:
            vectors.append(self._embed("/v1/embed-images", {"images": chunk}))
        return np.concatenate(vectors) if vectors else np.zeros((0, model.dimension), dtype=np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Text vectors, one row per text."""
        return self._embed("/v1/embed-texts", {"texts": list(texts)})

    def _embed(self, path: str, payload: dict[str, list]) -> np.ndarray:
        expected = self.model()
        body = self._request("POST", path, json.dumps(payload).encode())
        (items,) = payload.values()
        try:
            vectors = decode_vectors(body.get("vectors"))
            model_id = body["model_id"]
        except (ValueError, KeyError, AttributeError) as exc:
            raise ClipServerUnavailableError(f"CLIP server {self.where} answered {path} malformed: {exc}") from None
        if model_id != expected.model_id:
            self._model = None  # the next caller reads the new model's id
            raise ClipServerUnavailableError(
                f"CLIP server {self.where} now serves {model_id}, not {expected.model_id} as when this "
                "process started; run again to embed with the new model"
            )
        if len(vectors) != len(items) or (items and vectors.shape[1] != expected.dimension):
            raise ClipServerUnavailableError(
                f"CLIP server {self.where} answered {len(vectors)} vectors of {vectors.shape[1]} for {len(items)} "
                f"items of dimension {expected.dimension}"
            )
        return vectors

    def _request(self, method: str, path: str, content: bytes | None = None) -> dict[str, Any]:
        import httpx

        headers = self._headers | ({"Content-Type": "application/json"} if content is not None else {})
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                response = self._client.request(method, self.url + path, content=content, headers=headers)
            except httpx.HTTPError as exc:
                failure = type(exc).__name__
                if failure in RETRIED_AFTER:
                    continue
                what = "did not answer" if isinstance(exc, httpx.TimeoutException) else "failed on"
                timely = " in time" if isinstance(exc, httpx.TimeoutException) else ""
                raise ClipServerUnavailableError(
                    f"CLIP server {self.where} {what} {method} {path}{timely} ({failure})"
                ) from None
            if response.status_code == 503:
                failure = f"503: {_error_of(response)}"
                continue
            return self._answer(method, path, response)
        raise ClipServerUnavailableError(
            f"CLIP server {self.where} unreachable ({failure}) after {self.retries + 1} attempt(s); "
            f"start `heimdex clip-server` there, or unset {URL_ENV} to embed locally"
        )

    def _answer(self, method: str, path: str, response: Any) -> dict[str, Any]:
        if response.status_code == 401:
            raise ClipServerUnavailableError(
                f"CLIP server {self.where} refused the bearer token (401); set {TOKEN_ENV} to the server's token"
            )
        if response.status_code != 200:
            raise ClipServerUnavailableError(
                f"CLIP server {self.where} answered {response.status_code} to {method} {path}: {_error_of(response)}"
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ClipServerUnavailableError(f"CLIP server {self.where} answered {method} {path} with no JSON object")
        return body

    def _parse_model(self, body: dict[str, Any]) -> ServerModel:
        try:
            size = body.get("input_size")
            return ServerModel(
                model_id=str(body["model_id"]),
                dimension=int(body["dimension"]),
                input_size=(int(size[0]), int(size[1])) if size else None,
                placeholder=bool(body["placeholder"]),
                device=str(body.get("device") or "cpu"),
                batch_size=int(body.get("batch_size") or 32),
                max_body_bytes=int(body.get("max_body_bytes") or DEFAULT_MAX_BODY_BYTES),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ClipServerUnavailableError(
                f"CLIP server {self.where} described its model malformed ({type(exc).__name__}: {exc})"
            ) from None

    def close(self) -> None:
        self._client.close()


def _error_of(response: Any) -> str:
    """The server's one-line reason, or the start of whatever it sent."""
    try:
        body = response.json()
        message = body.get("error") or body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        message = None
    text = str(message) if message else response.text[:200] or response.reason_phrase
    return " ".join(text.split())
