"""Bearer tokens as the API checks them: signature, algorithm, audience, issuer, lifetime, clock skew and
reach (an owner or the explicit global claim), through the API and through ``verify_token``."""

import time
import uuid

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from heimdex_assets.api import AuthConfigError, TokenPolicy, create_app
from heimdex_assets.api.auth import verify_token
from heimdex_assets.resources import SearchIndex
from heimdex_assets_tests.api.test_admin_api import SECRET, bearer, token
from heimdex_assets_tests.test_backfills import free_port

SPEC_URL = "/v1/admin/embedding-spec"  # a GET: no rate limit, no body
NOT_ALLOWED = "invalid token: The specified alg value is not allowed"
NO_ACCESS = "no access: the token claims neither an owner_id nor scope 'global'"


@pytest.fixture
def api_resources(resources, tmp_path) -> dict:
    return resources | {"search_index": SearchIndex(sqlite_path=str(tmp_path / "search.sqlite"))}


@pytest.fixture
def client(api_resources) -> TestClient:
    return TestClient(create_app(api_resources, f"http://127.0.0.1:{free_port()}/graphql", SECRET))


def now() -> int:
    return int(time.time())


@pytest.mark.parametrize(
    ("make_token", "status", "detail"),
    [
        (lambda: token(expires_in_s=-60), 401, "token expired"),
        (lambda: token(nbf=now() + 120), 401, "invalid token: The token is not yet valid (nbf)"),
        (lambda: token(iat=now() + 120, exp=now() + 600), 401, "invalid token: The token is not yet valid (iat)"),
        (lambda: token(aud="another-service"), 401, "invalid token: Audience doesn't match"),
        (lambda: token(iss="someone-else"), 401, "invalid token: Invalid issuer"),
        (lambda: token(aud=None), 401, 'invalid token: Token is missing the "aud" claim'),
        (lambda: token(iss=None), 401, 'invalid token: Token is missing the "iss" claim'),
        (lambda: token(iat=None), 401, 'invalid token: Token is missing the "iat" claim'),
        (lambda: token(exp=None), 401, 'invalid token: Token is missing the "exp" claim'),
        (lambda: token(algorithm="none"), 401, NOT_ALLOWED),
        (lambda: token(algorithm="HS512", secret=SECRET * 2), 401, NOT_ALLOWED),
        (lambda: token(expires_in_s=24 * 3600 + 1), 401, "invalid token: lifetime (exp - iat) over 86400 s"),
        (
            lambda: token(owner_id=uuid.uuid4(), scope="global"),
            401,
            "invalid token: claims owner_id and scope 'global' exclude each other",
        ),
        (lambda: token(scope=None), 403, NO_ACCESS),
        (lambda: token(scope="all"), 403, NO_ACCESS),
        (lambda: token(scope=None, owner_id=None, role="viewer"), 403, NO_ACCESS),
    ],
    ids=[
        "expired",
        "nbf-in-future",
        "iat-in-future",
        "wrong-audience",
        "wrong-issuer",
        "no-audience",
        "no-issuer",
        "no-iat",
        "no-exp",
        "alg-none",
        "alg-hs512",
        "lifetime-too-long",
        "owner-and-global",
        "no-reach",
        "unknown-scope",
        "viewer-no-reach",
    ],
)
def test_tokens_failing_a_check_are_refused_with_the_documented_status(client, make_token, status, detail):
    value = make_token()
    for response in (client.get(SPEC_URL, headers=bearer(value)), client.post(SPEC_URL, headers=bearer(value))):
        assert (response.status_code, response.json()) == (status, {"detail": detail})
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert SECRET not in response.text
        assert value not in response.text


@pytest.mark.parametrize(
    "make_token",
    [
        lambda: token(),
        lambda: token(expires_in_s=-10),  # expired 10 s ago: within the 30 s of clock skew allowed
        lambda: token(iat=now() + 10, nbf=now() + 10),  # issued by a clock 10 s ahead
        lambda: token(expires_in_s=24 * 3600),  # the longest lifetime allowed
        lambda: token(aud=["another-service", "heimdex"]),  # one of its audiences is ours
    ],
    ids=["plain", "expired-within-leeway", "issued-ahead-within-leeway", "24h", "audience-list"],
)
def test_valid_global_admin_tokens_are_accepted(client, make_token):
    response = client.get(SPEC_URL, headers=bearer(make_token()))
    assert response.status_code == 200, response.text


def test_audience_issuer_and_lifetime_come_from_the_environment(monkeypatch, api_resources):
    monkeypatch.setenv("HEIMDEX_JWT_AUDIENCE", "heimdex-staging")
    monkeypatch.setenv("HEIMDEX_JWT_ISSUER", "https://auth.example.com")
    monkeypatch.setenv("HEIMDEX_JWT_MAX_LIFETIME_S", "600")
    client = TestClient(create_app(api_resources, f"http://127.0.0.1:{free_port()}/graphql", SECRET))
    ours = {"aud": "heimdex-staging", "iss": "https://auth.example.com"}
    assert client.get(SPEC_URL, headers=bearer(token(**ours))).status_code == 200
    for claims, detail in (({"aud": ours["aud"]}, "Invalid issuer"), ({"iss": ours["iss"]}, "Audience doesn't match")):
        assert client.get(SPEC_URL, headers=bearer(token(**claims))).json() == {"detail": f"invalid token: {detail}"}
    too_long = client.get(SPEC_URL, headers=bearer(token(expires_in_s=601, **ours)))
    assert (too_long.status_code, too_long.json()["detail"]) == (401, "invalid token: lifetime (exp - iat) over 600 s")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("HEIMDEX_JWT_MAX_LIFETIME_S", "a day", "HEIMDEX_JWT_MAX_LIFETIME_S must be a positive number of seconds"),
        ("HEIMDEX_JWT_MAX_LIFETIME_S", "0", "HEIMDEX_JWT_MAX_LIFETIME_S must be a positive number of seconds"),
        (
            "HEIMDEX_API_POST_RATE_PER_MINUTE",
            "-1",
            "HEIMDEX_API_POST_RATE_PER_MINUTE must be a positive number of requests per minute",
        ),
    ],
)
def test_a_malformed_limit_stops_the_api_with_one_line(monkeypatch, resources, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(AuthConfigError, match=f"^{message}, got '{value}'$"):
        create_app(resources, "http://127.0.0.1:1/graphql", SECRET)


def test_verify_token_answers_the_principal_of_an_owner_or_a_global_token():
    policy = TokenPolicy(secret=SECRET)
    owner = uuid.uuid4()
    confined = verify_token(token("viewer", owner), policy)
    assert (confined.subject, confined.role, confined.owner_id) == ("ops@example.com", "viewer", owner)
    assert verify_token(token(), policy).owner_id is None
    with pytest.raises(HTTPException) as refused:
        verify_token(token(owner_id="not-a-uuid"), policy)
    assert (refused.value.status_code, refused.value.detail) == (401, "invalid token: claim owner_id is not a UUID")
