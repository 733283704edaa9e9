"""The REST API: ``GET /v1/search`` for any token, and the seed's admin routes (reprocessing, generations).

``GET /v1/search`` answers ``search_scenes`` for the token's own owner (a global admin names one with
``owner_id``), on models loaded once per process at their first use. An admin's
``POST /v1/admin/reprocess-embeddings`` is planned with ``plan_reprocess`` (what the current spec makes
stale, in the scope) and launched with ``launch_plan_backfills`` on the webserver at
``HEIMDEX_DAGSTER_GRAPHQL_URL``; the response carries the backfill ids, whose progress
``GET /v1/admin/reprocess-embeddings/{id}`` reports.
Every ``/v1`` request passes ``RequestGuard`` before its body is read (token, POST rate, body size), and
every dependency failure is answered by one handler: a JSON 503 with ``Retry-After`` naming no host.
Serve it with ``uvicorn heimdex_assets.api.app:app`` (or ``--factory heimdex_assets.api.app:create_app``).
"""

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Security, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ConfigDict, model_validator
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.datastructures import Headers

from heimdex_assets.api.auth import (
    ADMIN_ROLE,
    AuthConfigError,
    Principal,
    TokenPolicy,
    require_admin,
    unauthorized,
    verify_token,
)
from heimdex_assets.assets.scene_search import align_alias
from heimdex_assets.backfills import (
    BackfillError,
    BackfillNotFoundError,
    backfill_status,
    backfills_in_progress,
    graphql_url_from_env,
    launch_plan_backfills,
)
from heimdex_assets.db.engine import DatabaseUnavailableError, redact
from heimdex_assets.generations import (
    ActivationError,
    GateRefusedError,
    activate,
    active_generations,
    coverage,
    generation_dict,
    last_refusal,
    previous_generations,
    rollback,
)
from heimdex_assets.launch import partition_weights
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import (
    ReprocessError,
    ReprocessRequest,
    ScopeNotFoundError,
    plan_reprocess,
)
from heimdex_assets.resources.clip_embedder import ClipWeightsUnavailableError
from heimdex_assets.resources.search_index import SearchIndexError
from heimdex_assets.resources.text_embedder import EmbeddingProviderError
from heimdex_assets.search import Mode, SearchError, search_scenes
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION
from heimdex_assets.spend_guard import PlanNotFoundError, SpendCeiling, SpendGuardError, approve, recent_plans
from heimdex_assets.steps import STEPS
from heimdex_assets.steps import step as step_named

logger = logging.getLogger(__name__)

# Dagster backfill ids are short lowercase strings; anything else is refused before reaching GraphQL.
BACKFILL_ID_PATTERN = r"^[a-z0-9_-]{1,64}$"
MAX_SEARCH_LIMIT = 100
MAX_QUERY_CHARS = 1000
MAX_BODY_BYTES = 64 * 1024  # every body this API takes is a few hundred bytes
POST_RATE_ENV = "HEIMDEX_API_POST_RATE_PER_MINUTE"
DEFAULT_POST_RATE_PER_MINUTE = 10
RETRY_AFTER_S = 30  # what a 503 asks a client to wait: a restarting database or webserver
PRINCIPAL_STATE = "heimdex_principal"  # where RequestGuard leaves the verified caller in the request's state


class ReprocessBody(BaseModel):
    """The seed's request body, plus ``since`` (only videos updated since then) and ``retry_failed``."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["video", "owner", "all"]
    video_id: uuid.UUID | None = None
    owner_id: uuid.UUID | None = None
    force: bool = False
    since: datetime | None = None
    retry_failed: bool = False
    # Only these steps (names or asset keys) and what depends on them; unknown ones are a 422.
    steps: list[str] | None = None
    # Required (true) when the plan's OpenAI estimate is above the spend ceiling (HEIMDEX_AUTO_MAX_*_PER_DAY).
    confirm_spend: bool = False

    @model_validator(mode="after")
    def _ids_for_scope(self) -> "ReprocessBody":
        # An id the scope would ignore is refused: the caller meant something narrower than what would run.
        if self.scope == "video" and self.video_id is None:
            raise ValueError("scope video needs video_id")
        if self.scope == "owner" and self.owner_id is None:
            raise ValueError("scope owner needs owner_id")
        if self.scope == "owner" and self.video_id is not None:
            raise ValueError("scope owner takes no video_id: use scope video")
        if self.scope == "all" and (self.owner_id is not None or self.video_id is not None):
            raise ValueError("scope all takes neither owner_id nor video_id")
        return self


class LaunchedBackfillOut(BaseModel):
    backfill_id: str
    assets: list[str]
    partitions: int


class ReprocessResponse(BaseModel):
    """The seed's response, plus the backfills that carry the work."""

    status: Literal["queued", "nothing_to_do"]
    spec_version: str
    scope: str
    video_count: int
    message: str
    backfill_ids: list[str]
    backfills: list[LaunchedBackfillOut]


def scoped_request(body: ReprocessBody, principal: Principal) -> ReprocessRequest:
    """The request ``principal`` may make: an owner-scoped token reaches its own owner's videos only."""
    owner_id = body.owner_id
    confined = principal.owner_id
    if confined is not None:
        if body.scope == "all":
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this token may only reprocess owner {confined}")
        if owner_id not in (None, confined):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this token may only reprocess owner {confined}")
        # For scope video the planner then answers "not found" for another owner's video, as for an unknown one.
        owner_id = confined
    since = body.since.replace(tzinfo=UTC) if body.since and body.since.tzinfo is None else body.since
    return ReprocessRequest(
        scope=body.scope,
        video_id=body.video_id,
        owner_id=owner_id,
        since=since,
        force=body.force,
        retry_failed=body.retry_failed,
        steps=tuple(body.steps) if body.steps else None,
    )


class SceneHitOut(BaseModel):
    """One scene found: where it is, its fused score, a transcript snippet and its rank in each fused list."""

    scene_id: uuid.UUID
    video_id: uuid.UUID
    scene_index: int
    start_s: float
    end_s: float
    score: float
    snippet: str
    ranks: dict[str, int]


class SearchResponse(BaseModel):
    """The owner searched, the query as asked, and the scenes found, best first."""

    owner_id: uuid.UUID
    query: str
    mode: Mode
    person_id: uuid.UUID | None
    results: list[SceneHitOut]


def search_owner(principal: Principal, owner_id: uuid.UUID | None) -> uuid.UUID:
    """The owner whose scenes ``principal`` searches: its token's ``owner_id`` claim, or for a global admin
    (``scope: global``) the ``owner_id`` it names. 403 for another owner or a global non-admin, 400 for a
    global admin naming none."""
    confined = principal.owner_id
    if confined is not None:
        if owner_id not in (None, confined):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this token may only search owner {confined}")
        return confined
    if principal.role != ADMIN_ROLE:  # a global token reaches every owner: admins only
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="a token of scope 'global' must be an admin's")
    if owner_id is None:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="this token is of scope 'global': pass owner_id=<uuid> to say whose scenes to search",
        )
    return owner_id


class TokenBuckets:
    """One token bucket per key, in this process's memory: ``per_minute`` requests a minute, in bursts of
    at most as many. ``clock`` (seconds, monotonic) is passed in so that a test can move time."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError(f"a rate limit must be a positive number of requests per minute, got {per_minute}")
        self.per_minute = per_minute
        self._refill_per_s = per_minute / 60
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, when counted)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when ``key`` may go ahead (one token taken), else the seconds until its next token."""
        with self._lock:
            now = self._clock()
            tokens, counted = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - counted) * self._refill_per_s)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self._refill_per_s


def post_rate_from_env() -> int:
    """``HEIMDEX_API_POST_RATE_PER_MINUTE`` (default 10); AuthConfigError when it is not a positive integer."""
    raw = os.environ.get(POST_RATE_ENV, "").strip() or str(DEFAULT_POST_RATE_PER_MINUTE)
    if not raw.isdigit() or int(raw) == 0:
        raise AuthConfigError(f"{POST_RATE_ENV} must be a positive number of requests per minute, got {raw!r}")
    return int(raw)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestGuard:
    """ASGI middleware, ahead of FastAPI's body parsing: under ``/v1/`` it verifies the bearer token
    (401/403) and charges each POST to the token subject's bucket (429 with ``Retry-After``); then it
    refuses a body over ``max_body_bytes`` (413): by its Content-Length without reading it, or as soon
    as reading it passes the limit. So an anonymous or oversized request is answered unread."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        policy: TokenPolicy,
        post_limit: TokenBuckets,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app, self.policy, self.post_limit, self.max_body_bytes = app, policy, post_limit, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"].startswith("/v1/"):
                principal = self.authenticate(Headers(scope=scope))
                scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
                if scope["method"] == "POST":
                    self.charge(principal)
            receive = await self.read_bounded_body(scope, receive)
        except HTTPException as exc:
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authenticate(self, headers: Headers) -> Principal:
        scheme, token = get_authorization_scheme_param(headers.get("authorization"))
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("missing bearer token")
        return verify_token(token, self.policy)

    def charge(self, principal: Principal) -> None:
        wait_s = self.post_limit.take(principal.subject)
        if wait_s > 0:
            retry_after = max(1, math.ceil(round(wait_s, 3)))  # rounded: 15.000000001 s is a 15
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"rate limit: {self.post_limit.per_minute} POST requests a minute per token subject; "
                f"retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    async def read_bounded_body(self, scope: Scope, receive: Receive) -> Receive:
        """The body read whole (at most ``max_body_bytes``), and a ``receive`` that hands it to the app."""
        too_large = HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"request body over {self.max_body_bytes} bytes"
        )
        length = Headers(scope=scope).get("content-length")
        if length is not None and not length.isdigit():
            raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="invalid Content-Length header")
        if length is not None and int(length) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees it as it would have
                pending = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise too_large
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay


def unavailable_handler(
    what: str, where: Callable[[], str] | None = None
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """An exception handler for a dependency that failed: a JSON 503 with ``Retry-After`` that says
    ``what`` failed but names no host, user or URL. The log line carries those: our errors name where
    (credentials redacted); for a driver's error, ``where`` says it."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        if where is not None:
            reason = f"{where()}: {type(exc).__name__}: {reason}"
        logger.warning("%s %s answered 503, %s unavailable: %s", request.method, request.url.path, what, reason)
        return JSONResponse(
            {"detail": f"{what} is unavailable; retry later"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    return handler


def create_app(
    resources: dict[str, object] | None = None,
    graphql_url: str | None = None,
    jwt_secret: str | None = None,
    post_limit: TokenBuckets | None = None,
) -> FastAPI:
    """The API over ``resources`` (default: from the environment, as the CLI) and the Dagster
    webserver at ``graphql_url`` (default: ``HEIMDEX_DAGSTER_GRAPHQL_URL``), with the token policy of
    ``HEIMDEX_JWT_*`` (``jwt_secret`` overrides the secret) and a POST rate limit per token subject
    (``post_limit``, default ``HEIMDEX_API_POST_RATE_PER_MINUTE``). Raises AuthConfigError without a
    usable JWT secret or with a malformed limit."""
    from heimdex_assets.settings import follow_recorded_placeholder, resources_from_env

    policy = TokenPolicy.from_env(jwt_secret)
    post_limit = post_limit or TokenBuckets(post_rate_from_env())
    resources = resources if resources is not None else follow_recorded_placeholder(resources_from_env(deferred=False))
    graphql_url = graphql_url or graphql_url_from_env()
    # Verification happens in RequestGuard, before the body is read; this only documents the scheme.
    bearer = HTTPBearer(auto_error=False)

    def caller(request: Request) -> Principal:
        principal = request.scope.get("state", {}).get(PRINCIPAL_STATE)
        if principal is None:  # not through RequestGuard: refuse rather than guess
            raise unauthorized("missing bearer token")
        return principal

    def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
        return require_admin(principal)

    def database_where() -> str:
        url = getattr(resources["db"], "url", None)
        return redact(url) if url else "the embedded server"

    search_router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Security(bearer)])

    @search_router.get("/search", response_model=SearchResponse)
    def search(
        principal: Annotated[Principal, Depends(caller)],
        q: Annotated[str, Query(max_length=MAX_QUERY_CHARS, description="words to search for")] = "",
        mode: Mode = "hybrid",
        person_id: Annotated[uuid.UUID | None, Query(description="rank scenes by this person")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_LIMIT)] = 10,
        owner_id: Annotated[uuid.UUID | None, Query(description="whose scenes (global admins only)")] = None,
    ) -> dict:
        """The owner's scenes that best match ``q`` (lexical, semantic or hybrid) and/or show ``person_id``."""
        owner = search_owner(principal, owner_id)
        try:
            # The same resource objects on every request: each loads its model once, at its first use.
            results = search_scenes(
                resources["db"],
                owner,
                q,
                mode=mode,
                person_id=person_id,
                limit=limit,
                text_embedder=resources["text_embedder"],
                clip=resources["clip"],
                search_index=resources["search_index"],
            )
        except SearchError as exc:  # also a person of another owner: "not found", like an unknown one
            raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from None
        return {"owner_id": owner, "query": q, "mode": mode, "person_id": person_id, "results": results}

    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Security(bearer)])

    @router.post("/reprocess-embeddings", response_model=ReprocessResponse)
    def reprocess_embeddings(body: ReprocessBody, principal: Annotated[Principal, Depends(admin)]) -> dict:
        """Plan what the latest embedding spec makes stale in the scope and queue it as Dagster backfills."""
        request = scoped_request(body, principal)
        try:
            with resources["db"].engine.connect() as conn:
                plan = plan_reprocess(conn, request, expected_models(conn, resources))
                weights = {kind: partition_weights(conn, kind) for kind in ("video", "owner")}
        except ScopeNotFoundError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
        except ReprocessError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
        result = {
            "spec_version": LATEST_EMBEDDING_SPEC_VERSION,
            "scope": request.scope,
            "video_count": plan.video_count,
            "backfill_ids": [],
            "backfills": [],
        }
        if plan.empty:
            message = f"Nothing to reprocess for {plan.video_count} video(s): all fresh for spec version "
            return result | {"status": "nothing_to_do", "message": message + LATEST_EMBEDDING_SPEC_VERSION}
        ceiling = SpendCeiling.from_env()
        over = (
            plan.estimated_openai_tokens > ceiling.tokens_per_day
            or plan.estimated_openai_cost_usd > ceiling.usd_per_day
        )
        if over and not body.confirm_spend:
            detail = {
                "message": f"this reprocess would send an estimated {plan.estimated_openai_tokens:,} tokens "
                f"(${plan.estimated_openai_cost_usd:.4f}) to OpenAI, above the ceiling of "
                f"{ceiling.tokens_per_day:,} tokens / ${ceiling.usd_per_day:.2f}: repeat with confirm_spend: true",
                "estimated_openai_tokens": plan.estimated_openai_tokens,
                "estimated_openai_cost_usd": plan.estimated_openai_cost_usd,
            }
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)
        if not body.force:  # the same work queued or running already (this API, the CLI, the sensor, the UI)
            planned = {(k, p) for k, a in plan.assets.items() for p in a.partitions}
            busy = sorted(b for b, pairs in backfills_in_progress(graphql_url).items() if pairs & planned)
            if busy:
                detail = {
                    "message": f"backfill(s) {', '.join(busy)} already redo partitions of this reprocess and are "
                    "still in progress: follow them, or repeat with force: true",
                    "backfill_ids": busy,
                }
                raise HTTPException(status.HTTP_409_CONFLICT, detail=detail)
        launched = launch_plan_backfills(plan, graphql_url, weights=weights)
        return result | {
            "status": "queued",
            "message": f"Queued embedding reprocessing for {plan.video_count} video(s) "
            f"using spec version {LATEST_EMBEDDING_SPEC_VERSION}",
            "backfill_ids": [b.backfill_id for b in launched],
            "backfills": [
                {"backfill_id": b.backfill_id, "assets": b.asset_keys, "partitions": b.partition_count}
                for b in launched
            ],
        }

    @router.get("/reprocess-embeddings/{backfill_id}")
    def reprocess_progress(
        backfill_id: Annotated[str, Path(pattern=BACKFILL_ID_PATTERN)], principal: Annotated[Principal, Depends(admin)]
    ) -> dict:
        """A launched backfill's status and partitions requested / in progress / completed / failed."""
        try:
            progress = backfill_status(graphql_url, backfill_id)
        except BackfillNotFoundError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
        if principal.owner_id is not None and progress["owner_scope"] != str(principal.owner_id):
            # Another owner's backfill (or one of all owners) is "not found" for an owner-scoped token.
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"Dagster has no backfill {backfill_id}")
        return progress

    def global_admin(principal: Annotated[Principal, Depends(admin)]) -> Principal:
        if principal.owner_id is not None:  # a flip changes what every owner's searches read
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="an owner-scoped token cannot change generations")
        return principal

    @router.get("/reprocess-plans")
    def reprocess_plans(principal: Annotated[Principal, Depends(global_admin)]) -> dict:
        """The spend guard's latest plans, newest first: the one waiting for approval, if any, and those launched."""
        with resources["db"].engine.connect() as conn:
            plans = [p.as_dict() for p in recent_plans(conn)]
        return {"waiting": next((p for p in plans if p["status"] == "waiting"), None), "plans": plans}

    @router.post("/reprocess-plans/{plan_id}/approve")
    def approve_plan(plan_id: uuid.UUID, principal: Annotated[Principal, Depends(global_admin)]) -> dict:
        """Launch the plan waiting for approval, exactly its recorded partitions, as backfills."""
        with resources["db"].engine.connect() as conn:
            models = expected_models(conn, resources)
            weights = {kind: partition_weights(conn, kind) for kind in ("video", "owner")}

        def launch(plan: object) -> list[str]:
            return [b.backfill_id for b in launch_plan_backfills(plan, graphql_url, weights=weights)]

        try:
            stored = approve(resources["db"].engine, plan_id, f"admin api: {principal.subject}", models, launch)
        except PlanNotFoundError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from None
        except SpendGuardError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
        return stored.as_dict()

    @router.get("/embedding-spec")
    def embedding_spec(principal: Annotated[Principal, Depends(admin)]) -> dict:
        """Per step: the spec's version, the model expected, the active and previous generations (with the
        gate's figures at their activation) and the candidate's coverage (partitions per state, items done)
        and last refusal by the evaluation gate."""
        with resources["db"].engine.connect() as conn:
            models = expected_models(conn, resources)
            active, previous = active_generations(conn), previous_generations(conn)
            steps = {}
            for step in STEPS:
                covered = coverage(conn, step, models)
                steps[step.name] = {
                    "asset_key": step.asset_key,
                    "step_version": step.version,
                    "model_id": models[step.name],
                    "active": generation_dict(active.get(step.name)),
                    "previous": generation_dict(previous.get(step.name)),
                    "candidate_coverage": covered.as_dict(),
                    "candidate_gate_refused": last_refusal(conn, step.name, step.version, models[step.name]),
                }
        return {"spec_version": LATEST_EMBEDDING_SPEC_VERSION, "steps": steps}

    @router.post("/generations/{step_name}/{action}")
    def flip_generation(
        step_name: Annotated[str, Path(pattern="^[a-z_]{1,40}$")],
        action: Annotated[str, Path(pattern="^(activate|rollback)$")],
        principal: Annotated[Principal, Depends(global_admin)],
        force: bool = False,
    ) -> dict:
        """Make a step's candidate (``activate``, ``force`` below full coverage) or its previous generation
        (``rollback``) the one searches read; written to the audit trail with the token's subject."""
        try:
            step = step_named(step_name)
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc.args[0])) from None
        actor, reason = f"admin api: {principal.subject}", f"POST {action}"
        try:
            with resources["db"].transaction() as conn:
                if action == "activate":
                    models = expected_models(conn, resources)
                    flipped = activate(conn, step, models, actor=actor, reason=reason, force=force, resources=resources)
                else:
                    flipped = rollback(conn, step.name, actor=actor, reason=reason)
        except GateRefusedError as exc:  # the figures, for the operator deciding whether to force it
            detail = {"message": str(exc), "evaluation": exc.evaluation.as_dict()}
            raise HTTPException(status.HTTP_409_CONFLICT, detail=detail) from None
        except ActivationError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
        if step.name == "scene_search":
            align_alias(resources["db"], resources["search_index"])
        return {"step": step.name, "changed": flipped is not None, "active": generation_dict(flipped)}

    app = FastAPI(title="Heimdex API", version=LATEST_EMBEDDING_SPEC_VERSION)
    app.include_router(search_router)
    app.include_router(router)
    app.add_middleware(RequestGuard, policy=policy, post_limit=post_limit)
    # Any dependency failing at any time (a database gone after start included) is a 503 of one shape.
    in_database = unavailable_handler("the application database", database_where)
    handlers = {
        DatabaseUnavailableError: unavailable_handler("the application database"),
        OperationalError: in_database,  # raised mid-request by SQLAlchemy, e.g. a server that went away
        InterfaceError: in_database,
        SearchIndexError: unavailable_handler("the search index"),
        EmbeddingProviderError: unavailable_handler("the text embedding provider"),
        ClipWeightsUnavailableError: unavailable_handler("the CLIP model"),
        BackfillError: unavailable_handler("the Dagster webserver"),
    }
    for error, handler in handlers.items():
        app.add_exception_handler(error, handler)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """``app``, built from the environment on first access, for ``uvicorn heimdex_assets.api.app:app``;
    without a usable JWT secret the process stops with one line, not a traceback."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        try:
            _app = create_app()
        except AuthConfigError as exc:
            raise SystemExit(f"heimdex admin API: {exc}") from None
    return _app
