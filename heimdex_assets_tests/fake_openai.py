"""A local OpenAI-compatible embeddings server, reached through the real ``openai`` client.

The only stand-in in the suite: it replaces the paid API. Tests script its answers (429 with
Retry-After, 500, 400 for inputs over a length or for inputs declared invalid), run a hook on each request
(to change the database while a run waits for its vectors) and read back every request it received.
"""

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


@lru_cache(maxsize=100_000)
def _random_vector(key: str, dimension: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=dimension).astype(np.float32)


def fake_vector(text: str, dimension: int = 1536, random_vectors: bool = False) -> np.ndarray:
    """The deterministic (not normalised) vector the server returns for ``text``: a bag of words (texts
    sharing words are near, so retrieval works as with a real model), plus a little of the whole text
    so that no two texts are equal. ``random_vectors``: a vector of the whole text only, which ranks
    nothing (the deliberately worse model)."""
    whole = _random_vector(text, dimension)
    if random_vectors:
        return whole * 3
    words = re.findall(r"\w+", text.lower())
    bag = sum((_random_vector("word:" + w, dimension) for w in words), np.zeros(dimension, dtype=np.float32))
    return (bag + 0.2 * whole) * 3


# What the API answers for an input it cannot embed (an empty string, say).
INVALID_INPUT_MESSAGE = (
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
)


@dataclass
class FakeOpenAI:
    """Scripted failures are served first, in order; then a request holding an ``invalid_inputs`` text is
    answered 400; every other request succeeds. ``on_request(inputs)`` runs before each answer."""

    max_input_chars: int | None = None
    random_vectors: bool = False
    script: list[tuple[int, dict]] = field(default_factory=list)
    invalid_inputs: set[str] = field(default_factory=set)
    on_request: Callable[[list[str]], None] | None = None
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    url: str = ""

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                if fake.on_request is not None:
                    fake.on_request(inputs)
                if fake.script:
                    status, extra_headers = fake.script.pop(0)
                    return self._send(status, {"error": {"message": f"scripted {status}", "type": "x"}}, extra_headers)
                if fake.max_input_chars and any(len(t) > fake.max_input_chars for t in inputs):
                    message = (
                        "This model's maximum context length is 8192 tokens, however you requested "
                        "9000 tokens. Please reduce your prompt."
                    )
                    return self._send(400, {"error": {"message": message, "type": "invalid_request_error"}})
                if fake.invalid_inputs.intersection(inputs):
                    error = {"message": INVALID_INPUT_MESSAGE, "type": "invalid_request_error"}
                    return self._send(400, {"error": error})
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": fake_vector(t, random_vectors=fake.random_vectors).tolist(),
                    }
                    for i, t in enumerate(inputs)
                ]
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": data,
                        "model": body["model"],
                        "usage": {"prompt_tokens": 1, "total_tokens": 1},
                    },
                )

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
