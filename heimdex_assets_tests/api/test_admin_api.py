"""The admin REST API through FastAPI's TestClient, against the real database and, for launches, a
real dagster-webserver (no daemon: a launched backfill stays REQUESTED, which is what is asserted)."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from heimdex_assets.api import TokenBuckets, create_app
from heimdex_assets.db.embedded import EmbeddedPostgres
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets.runs import FORCE_TAG, OWNER_SCOPE_TAG
from heimdex_assets.spec import LATEST_EMBEDDING_SPEC_VERSION
from heimdex_assets_tests.conftest import STATE_DIR
from heimdex_assets_tests.test_backfills import REPO, Deployment, free_port

SECRET = "api-test-secret-0123456789abcdef0123456789"
URL = "/v1/admin/reprocess-embeddings"


def token(
    role: str = "admin",
    owner_id: uuid.UUID | None = None,
    expires_in_s: int = 300,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: object,
) -> str:
    """A token as the README mints one: confined to ``owner_id``, else ``scope: global``; ``claims``
    override (a None value drops the claim)."""
    now = int(time.time())
    minted = {"sub": "ops@example.com", "role": role, "aud": "heimdex", "iss": "heimdex", "iat": now}
    minted |= {"exp": now + expires_in_s} | ({"owner_id": str(owner_id)} if owner_id else {"scope": "global"})
    minted |= claims
    key = None if algorithm == "none" else secret
    return jwt.encode({k: v for k, v in minted.items() if v is not None}, key, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/graphql"  # nothing listens there


@pytest.fixture
def api_resources(resources, tmp_path) -> dict:
    """The test resources with a search index in tmp_path."""
    return resources | {"search_index": SearchIndex(sqlite_path=str(tmp_path / "search.sqlite"))}


@pytest.fixture
def client(api_resources, unreachable_url) -> TestClient:
    return TestClient(create_app(api_resources, unreachable_url, SECRET))


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Basic b3BzOnB3"}, "missing bearer token"),
        (bearer("not-a-jwt"), "invalid token: Not enough segments"),
        (
            bearer(token(secret="another-secret-0123456789abcdef0123456789")),
            "invalid token: Signature verification failed",
        ),
        (bearer(token(expires_in_s=-60)), "token expired"),
    ],
    ids=["none", "basic", "malformed", "bad-signature", "expired"],
)
def test_requests_without_a_valid_token_are_401_with_a_bearer_challenge(client, headers, detail):
    for response in (
        client.post(URL, json={"scope": "all"}, headers=headers),
        client.get(f"{URL}/abcdefgh", headers=headers),
    ):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json() == {"detail": detail}
        assert SECRET not in response.text
        if "Authorization" in headers:
            assert headers["Authorization"].split()[-1] not in response.text


def test_non_admins_and_owner_scoped_admins_beyond_their_owner_are_403(client, rows):
    a, b = rows.owner("a"), rows.owner("b")
    response = client.post(URL, json={"scope": "owner", "owner_id": str(a)}, headers=bearer(token(role="viewer")))
    assert (response.status_code, response.json()["detail"]) == (403, "role 'admin' required")
    scoped = bearer(token(owner_id=a))
    for body in ({"scope": "all"}, {"scope": "owner", "owner_id": str(b)}):
        response = client.post(URL, json=body, headers=scoped)
        assert (response.status_code, response.json()["detail"]) == (403, f"this token may only reprocess owner {a}")


def test_invalid_bodies_are_422(client, rows):
    headers = bearer(token())
    missing = client.post(URL, json={"scope": "video", "force": False}, headers=headers)
    assert missing.status_code == 422
    assert "scope video needs video_id" in missing.text
    malformed = client.post(URL, json={"scope": "video", "video_id": "12345"}, headers=headers)
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["loc"] == ["body", "video_id"]
    assert client.post(URL, json={"scope": "everything"}, headers=headers).status_code == 422
    processing = rows.video(rows.owner(), n_scenes=1, status="PROCESSING")
    response = client.post(URL, json={"scope": "video", "video_id": str(processing)}, headers=headers)
    assert (response.status_code, response.json()["detail"]) == (
        422,
        f"video {processing} is PROCESSING, not READY: nothing to reprocess",
    )


def test_unknown_video_and_another_owners_video_are_the_same_404(client, rows):
    a, b = rows.owner("a"), rows.owner("b")
    video_b = rows.video(b, n_scenes=1)
    unknown = uuid.uuid4()
    response = client.post(URL, json={"scope": "video", "video_id": str(unknown)}, headers=bearer(token()))
    assert (response.status_code, response.json()["detail"]) == (404, f"video {unknown} not found")
    response = client.post(URL, json={"scope": "owner", "owner_id": str(unknown)}, headers=bearer(token()))
    assert (response.status_code, response.json()["detail"]) == (404, f"owner {unknown} not found")

    scoped = bearer(token(owner_id=a))
    # Nothing launched either: the webserver URL is unreachable, so a launch attempt would be a 503.
    details = {}
    for video in (unknown, video_b):
        response = client.post(URL, json={"scope": "video", "video_id": str(video), "force": True}, headers=scoped)
        assert response.status_code == 404
        details[video] = response.json()["detail"].replace(str(video), "<id>")
    assert details[unknown] == details[video_b] == f"video <id> not found for owner {a}"


def test_a_fresh_video_is_nothing_to_do(client, rows, resources, instance, tmp_path):
    from heimdex_assets.assets import VIDEO_ASSETS
    from heimdex_assets_tests.conftest import materialize_videos

    video = rows.video(rows.owner(), n_scenes=1)
    search_index = SearchIndex(sqlite_path=str(tmp_path / "search.sqlite"))  # the client's index
    materialize_videos(VIDEO_ASSETS, [str(video)], resources | {"search_index": search_index}, instance)
    response = client.post(URL, json={"scope": "video", "video_id": str(video)}, headers=bearer(token()))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "nothing_to_do",
        "spec_version": LATEST_EMBEDDING_SPEC_VERSION,
        "scope": "video",
        "video_count": 1,
        "message": f"Nothing to reprocess for 1 video(s): all fresh for spec version {LATEST_EMBEDDING_SPEC_VERSION}",
        "backfill_ids": [],
        "backfills": [],
    }


def assert_unavailable(response, what: str, *hidden: str) -> None:
    """A dependency failure as the API answers it: JSON 503 with Retry-After, naming none of ``hidden``."""
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    assert response.json() == {"detail": f"{what} is unavailable; retry later"}
    for secret in hidden:
        assert secret not in response.text


def test_an_unreachable_webserver_is_a_503_that_names_no_host_but_the_log_does(client, rows, unreachable_url, caplog):
    video = rows.video(rows.owner(), n_scenes=1)
    port = unreachable_url.split(":")[2].split("/")[0]
    with caplog.at_level(logging.WARNING, logger="heimdex_assets.api.app"):
        response = client.post(URL, json={"scope": "video", "video_id": str(video)}, headers=bearer(token()))
        assert_unavailable(response, "the Dagster webserver", "127.0.0.1", port)
        response = client.get(f"{URL}/abcdefgh", headers=bearer(token()))
        assert_unavailable(response, "the Dagster webserver", "127.0.0.1", port)
    assert [r.getMessage() for r in caplog.records if r.name == "heimdex_assets.api.app"] == [
        f"{method} {path} answered 503, the Dagster webserver unavailable: "
        f"cannot reach the Dagster webserver at {unreachable_url}: ConnectError"
        for method, path in (("POST", URL), ("GET", f"{URL}/abcdefgh"))
    ]


def test_the_server_refuses_to_start_without_a_jwt_secret(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "HEIMDEX_JWT_SECRET"}
    argv = [sys.executable, "-m", "uvicorn", "heimdex_assets.api.app:app", "--port", str(free_port())]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "heimdex admin API: HEIMDEX_JWT_SECRET is not set: the admin API needs it to verify bearer tokens"
    )


@pytest.fixture
def deployment(tmp_path, database_url, tiny_clip_checkpoint):
    deployment = Deployment(tmp_path, database_url, tiny_clip_checkpoint)
    try:
        yield deployment
    finally:
        deployment.stop()


def test_an_owner_scoped_admin_queues_backfills_of_its_owner_and_reads_their_progress(
    deployment, db, rows, resources, tmp_path
):
    a, b = rows.owner("a"), rows.owner("b")
    videos_a = {str(rows.video(a, n_scenes=1)), str(rows.video(a, n_scenes=1))}
    rows.video(b, n_scenes=1)
    deployment.start_webserver()
    resources = resources | {"search_index": SearchIndex(sqlite_path=str(tmp_path / "search.sqlite"))}
    client = TestClient(create_app(resources, deployment.graphql_url, SECRET))
    headers = bearer(token(owner_id=a))

    response = client.post(URL, json={"scope": "owner", "owner_id": str(a), "force": True}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["scope"], body["video_count"], body["spec_version"]) == (
        "queued",
        "owner",
        2,
        LATEST_EMBEDDING_SPEC_VERSION,
    )
    assert (
        body["message"]
        == f"Queued embedding reprocessing for 2 video(s) using spec version {LATEST_EMBEDDING_SPEC_VERSION}"
    )
    assert body["backfill_ids"] == [lb["backfill_id"] for lb in body["backfills"]]
    assert {tuple(sorted(lb["assets"])): lb["partitions"] for lb in body["backfills"]} == {
        ("scene_clip_embeddings", "scene_person_embeddings", "scene_search_index", "scene_text_embeddings"): 2,
        ("person_photo_embeddings", "person_query_embeddings"): 1,
    }

    instance = dg.DagsterInstance.from_config(str(deployment.home))
    # The launch registered the partitions it targets, and owner b's video is not among them.
    assert (set(instance.get_dynamic_partitions("videos")), instance.get_dynamic_partitions("owners")) == (
        videos_a,
        [str(a)],
    )
    for launched in body["backfills"]:
        backfill = instance.get_backfill(launched["backfill_id"])
        assert (backfill.tags[OWNER_SCOPE_TAG], backfill.tags[FORCE_TAG]) == (str(a), "true")
        progress = client.get(f"{URL}/{launched['backfill_id']}", headers=headers)
        assert progress.status_code == 200, progress.text
        status = progress.json()
        assert (status["status"], status["done"], status["partitions"]) == ("REQUESTED", False, launched["partitions"])
        assert (status["requested"], status["completed"], status["failed"]) == (
            len(launched["assets"]) * launched["partitions"],
            0,
            0,
        )

        assert status["owner_scope"] == str(a)
        # Another owner's admin cannot even learn that the backfill exists; a global admin can read it.
        theirs = client.get(f"{URL}/{launched['backfill_id']}", headers=bearer(token(owner_id=b)))
        assert (theirs.status_code, theirs.json()["detail"]) == (
            404,
            f"Dagster has no backfill {launched['backfill_id']}",
        )
        assert client.get(f"{URL}/{launched['backfill_id']}", headers=bearer(token())).status_code == 200

    response = client.get(f"{URL}/nonesuch", headers=headers)
    assert (response.status_code, response.json()["detail"]) == (404, "Dagster has no backfill nonesuch")

    # The same work again while those backfills are queued: 409 naming them, and nothing launched twice...
    launched_ids = sorted(body["backfill_ids"])
    again = client.post(URL, json={"scope": "owner", "owner_id": str(a)}, headers=headers)
    assert again.status_code == 409, again.text
    assert again.json()["detail"]["backfill_ids"] == launched_ids
    assert "still in progress: follow them, or repeat with force: true" in again.json()["detail"]["message"]
    video = sorted(videos_a)[0]
    one = client.post(URL, json={"scope": "video", "video_id": video}, headers=headers)
    assert one.status_code == 409 and one.json()["detail"]["backfill_ids"] == sorted(
        b["backfill_id"] for b in body["backfills"] if "scene_text_embeddings" in b["assets"]
    )
    assert len(instance.get_backfills()) == len(launched_ids)
    # ...unless forced.
    forced = client.post(URL, json={"scope": "video", "video_id": video, "force": True}, headers=headers)
    assert forced.status_code == 200 and len(instance.get_backfills()) == len(launched_ids) + 1

    # A plan the spend guard holds: approved by a global admin through the API, exactly its partitions.
    from heimdex_assets.models import expected_models
    from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
    from heimdex_assets.spend_guard import record_plan

    b_video = str(rows.video(b, n_scenes=1))
    with db.transaction() as conn:
        plan = plan_reprocess(conn, ReprocessRequest("video", uuid.UUID(b_video)), expected_models(conn, resources))
        stored, _ = record_plan(conn, plan, created_by="stale_partitions_sensor", status="waiting", reason="over")
    plans_url = "/v1/admin/reprocess-plans"
    assert client.get(plans_url, headers=headers).status_code == 403  # plans span owners: global admins only
    listed = client.get(plans_url, headers=bearer(token())).json()
    assert listed["waiting"]["plan_id"] == str(stored.id) and listed["waiting"]["partitions"] == 4
    assert client.post(f"{plans_url}/{stored.id}/approve", headers=headers).status_code == 403
    approved = client.post(f"{plans_url}/{stored.id}/approve", headers=bearer(token()))
    assert approved.status_code == 200, approved.text
    assert (approved.json()["status"], approved.json()["approved_by"]) == ("launched", "admin api: ops@example.com")
    (backfill_id,) = approved.json()["backfill_ids"]
    targets = instance.get_backfill(backfill_id).asset_backfill_data.target_subset.iterate_asset_partitions()
    assert {(t.asset_key.to_user_string(), t.partition_key) for t in targets} == {
        (k, b_video) for k, a in plan.assets.items() if a.partitions
    }
    twice = client.post(f"{plans_url}/{stored.id}/approve", headers=bearer(token()))
    assert twice.status_code == 409 and "only a waiting plan can be approved" in twice.json()["detail"]
    unknown = client.post(f"{plans_url}/{uuid.uuid4()}/approve", headers=bearer(token()))
    assert unknown.status_code == 404 and unknown.json()["detail"].startswith("no reprocess plan ")


def test_a_reprocess_above_the_spend_ceiling_needs_confirm_spend(api_resources, unreachable_url, rows, monkeypatch):
    from heimdex_assets.resources import TextEmbedder

    owner = rows.owner()
    rows.video(owner, n_scenes=2)
    embedder = TextEmbedder(provider="openai", openai_api_key="sk-test", openai_base_url=unreachable_url)
    client = TestClient(create_app(api_resources | {"text_embedder": embedder}, unreachable_url, SECRET))
    monkeypatch.setenv("HEIMDEX_AUTO_MAX_TOKENS_PER_DAY", "10")
    request = {"scope": "owner", "owner_id": str(owner)}

    refused = client.post(URL, json=request, headers=bearer(token()))
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert detail["estimated_openai_tokens"] > 10
    assert detail["message"].endswith("above the ceiling of 10 tokens / $1.00: repeat with confirm_spend: true")
    # Confirmed, it goes on to the webserver (unreachable here: the documented 503).
    confirmed = client.post(URL, json=request | {"confirm_spend": True}, headers=bearer(token()))
    assert confirmed.status_code == 503


def test_generations_are_shown_flipped_and_rolled_back_by_a_global_admin_only(client, db, rows, resources, instance):
    from heimdex_assets.assets import scene_text_embeddings
    from heimdex_assets_tests.conftest import materialize_videos

    owner = rows.owner()
    video = rows.video(owner, n_scenes=2)
    spec = client.get("/v1/admin/embedding-spec", headers=bearer(token()))
    assert spec.status_code == 200
    text_step = spec.json()["steps"]["scene_text"]
    assert text_step["active"] is None and text_step["candidate_coverage"]["states"] == {"missing": 1}
    refused = client.post("/v1/admin/generations/scene_text/activate", headers=bearer(token()))
    assert refused.status_code == 409 and "does not cover every partition" in refused.json()["detail"]

    materialize_videos([scene_text_embeddings], [str(video)], resources, instance)  # complete: flips by itself
    text_step = client.get("/v1/admin/embedding-spec", headers=bearer(token())).json()["steps"]["scene_text"]
    assert text_step["active"]["model_id"] == resources["text_embedder"].model_id
    assert text_step["candidate_coverage"]["items_done"] == 4 and text_step["candidate_coverage"]["complete"]

    scoped = bearer(token(owner_id=owner))
    assert client.post("/v1/admin/generations/scene_text/rollback", headers=scoped).status_code == 403
    nothing = client.post("/v1/admin/generations/scene_text/rollback", headers=bearer(token()))
    assert nothing.status_code == 409 and "no previous generation" in nothing.json()["detail"]
    again = client.post("/v1/admin/generations/scene_text/activate", headers=bearer(token()))
    assert again.status_code == 200 and again.json()["changed"] is False
    assert client.post("/v1/admin/generations/nope/activate", headers=bearer(token())).status_code == 404
    with db.engine.connect() as conn:
        actors = conn.execute(text("SELECT actor FROM generation_events ORDER BY id")).scalars().all()
    assert actors[0].startswith("run ")  # the automatic flip; refused and no-op requests leave no event


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"scope": "all", "owner_id": str(uuid.uuid4())}, "scope all takes neither owner_id nor video_id"),
        ({"scope": "all", "video_id": str(uuid.uuid4())}, "scope all takes neither owner_id nor video_id"),
        (
            {"scope": "owner", "owner_id": str(uuid.uuid4()), "video_id": str(uuid.uuid4())},
            "scope owner takes no video_id: use scope video",
        ),
    ],
    ids=["all-with-owner", "all-with-video", "owner-with-video"],
)
def test_inconsistent_scopes_are_422_not_silently_widened(client, body, detail):
    response = client.post(URL, json=body, headers=bearer(token()))
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == f"Value error, {detail}"


def test_an_unknown_step_is_422_naming_the_valid_ones(client, rows):
    rows.video(rows.owner())
    response = client.post(URL, json={"scope": "all", "steps": ["scene_txt"]}, headers=bearer(token()))
    assert response.status_code == 422
    assert "scene_txt" in response.json()["detail"] and "scene_text" in response.json()["detail"]


BIG_BODY_BYTES = 24 * 1024 * 1024


def asgi_post(app, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, dict, int]:
    """POST ``chunks`` to ``app`` as an ASGI server would (no Content-Length unless in ``headers``):
    the status, the JSON answer and how many times the app asked for the next piece of body."""
    asked = 0

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        if asked <= len(chunks):
            return {"type": "http.request", "body": chunks[asked - 1], "more_body": asked < len(chunks)}
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), asked


def test_an_anonymous_or_oversized_body_is_refused_before_it_is_read(api_resources, unreachable_url):
    app = create_app(api_resources, unreachable_url, SECRET)
    piece = b" " * 16384  # JSON whitespace: the body would parse, were it read
    declared = {"Content-Type": "application/json", "Content-Length": str(BIG_BODY_BYTES)}
    chunked = {"Content-Type": "application/json"}
    admin = {"Authorization": f"Bearer {token()}"}

    # Anonymous: 401 whether the size is declared or not, and not one byte of the body asked for.
    for headers in (declared, chunked):
        status, answer, asked = asgi_post(app, headers, [piece] * (BIG_BODY_BYTES // len(piece)))
        assert (status, answer, asked) == (401, {"detail": "missing bearer token"}, 0)
    # Authenticated: a declared size over 64 KiB is refused unread, an undeclared one at the first piece past it.
    status, answer, asked = asgi_post(app, declared | admin, [piece] * (BIG_BODY_BYTES // len(piece)))
    assert (status, answer, asked) == (413, {"detail": "request body over 65536 bytes"}, 0)
    status, answer, asked = asgi_post(app, chunked | admin, [piece] * (BIG_BODY_BYTES // len(piece)))
    assert (status, answer, asked) == (413, {"detail": "request body over 65536 bytes"}, 5)
    # A body within the limit, in pieces, reaches the route whole.
    status, answer, _ = asgi_post(app, chunked | admin, [b'{"scope": ', b'"everything"}'])
    assert (status, answer["detail"][0]["loc"]) == (422, ["body", "scope"])

    # The same through an HTTP client.
    client = TestClient(app)
    big = b" " * BIG_BODY_BYTES
    response = client.post(URL, content=big, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (401, {"detail": "missing bearer token"})
    response = client.post(URL, content=big, headers={"Content-Type": "application/json"} | admin)
    assert (response.status_code, response.json()) == (413, {"detail": "request body over 65536 bytes"})


def test_posts_beyond_a_tokens_rate_are_429_with_retry_after(api_resources, unreachable_url):
    clock = [1000.0]
    limit = TokenBuckets(2, clock=lambda: clock[0])  # 2 a minute: one more every 30 s
    client = TestClient(create_app(api_resources, unreachable_url, SECRET, post_limit=limit))
    refused = {"scope": "everything"}  # a 422, counted all the same: the limit applies before the body is read
    headers = bearer(token())
    assert [client.post(URL, json=refused, headers=headers).status_code for _ in range(2)] == [422, 422]
    response = client.post(URL, json=refused, headers=headers)
    assert (response.status_code, response.headers["Retry-After"], response.json()) == (
        429,
        "30",
        {"detail": "rate limit: 2 POST requests a minute per token subject; retry in 30 s"},
    )
    # Another subject has a bucket of its own, and reads are not limited.
    assert client.post(URL, json=refused, headers=bearer(token(sub="other@example.com"))).status_code == 422
    assert client.get("/v1/admin/embedding-spec", headers=headers).status_code == 200
    clock[0] += 15
    response = client.post(URL, json=refused, headers=headers)
    assert (response.status_code, response.headers["Retry-After"]) == (429, "15")
    clock[0] += 16
    assert client.post(URL, json=refused, headers=headers).status_code == 422


@pytest.fixture
def stoppable_database() -> EmbeddedPostgres:
    """A PostgreSQL of its own, on a port of its own, for a test to stop."""
    server = EmbeddedPostgres(data_dir=STATE_DIR / "api-outage-postgres", port=free_port(), database="outage")
    server.ensure_running()
    try:
        yield server
    finally:
        server.stop()


def test_a_database_that_goes_away_after_start_is_a_json_503_naming_no_host(
    stoppable_database, api_resources, unreachable_url, caplog
):
    server = stoppable_database
    db = AppDatabase(url=server.url)
    client = TestClient(create_app(api_resources | {"db": db}, unreachable_url, SECRET))
    first = client.post(URL, json={"scope": "all"}, headers=bearer(token()))
    assert (first.status_code, first.json()["status"]) == (200, "nothing_to_do")

    server.stop()
    hidden = ("127.0.0.1", str(server.port), "heimdex", "outage", unreachable_url, "Traceback")
    with caplog.at_level(logging.WARNING, logger="heimdex_assets.api.app"):
        for response in (
            client.post(URL, json={"scope": "all"}, headers=bearer(token())),
            client.get("/v1/admin/embedding-spec", headers=bearer(token())),
            client.post("/v1/admin/generations/scene_text/rollback", headers=bearer(token())),
            client.get("/v1/search", params={"q": "narwhal"}, headers=bearer(token("viewer", uuid.uuid4()))),
        ):
            assert_unavailable(response, "the application database", *hidden)
    records = [r for r in caplog.records if r.name == "heimdex_assets.api.app"]
    assert len(records) == 4
    for record in records:  # the log line names the server, without a traceback
        assert f"@127.0.0.1:{server.port}/outage: OperationalError: " in record.getMessage()
        assert record.exc_info is None
    db.engine.dispose()
