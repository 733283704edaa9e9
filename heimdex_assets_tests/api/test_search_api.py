"""``GET /v1/search`` through FastAPI's TestClient, over the read path's corpus (every asset materialised
once for the module) on the real PostgreSQL and OpenSearch."""

import dataclasses
import logging
import uuid

import pytest
from fastapi.testclient import TestClient

from heimdex_assets.api import create_app
from heimdex_assets.resources import AppDatabase, SearchIndex
from heimdex_assets_tests import test_search as read_path
from heimdex_assets_tests.api.test_admin_api import SECRET, assert_unavailable, bearer, token
from heimdex_assets_tests.test_backfills import free_port

URL = "/v1/search"
world = read_path.world  # the read path's module-scoped corpus, materialised once for this module too


@pytest.fixture(scope="module")
def client(world) -> TestClient:
    _, resources = world
    return TestClient(create_app(resources, f"http://127.0.0.1:{free_port()}/graphql", SECRET))


def owner_of(corpus, scene):
    return next(o for o in corpus.owners if o.id == scene.owner_id)


def as_json(results) -> list[dict]:
    """``search_scenes``'s results as the API writes them."""
    return [{k: str(v) if isinstance(v, uuid.UUID) else v for k, v in dataclasses.asdict(r).items()} for r in results]


@pytest.mark.parametrize("mode", ["lexical", "semantic", "hybrid"])
def test_an_owners_token_finds_the_scene_a_query_was_written_for(world, client, mode):
    corpus, _ = world
    target = corpus.distinctive["narwhal"]
    owner = owner_of(corpus, target)
    response = client.get(URL, params={"q": "the narwhal", "mode": mode}, headers=bearer(token("viewer", owner.id)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["owner_id"], body["query"], body["mode"], body["person_id"]) == (
        str(owner.id),
        "the narwhal",
        mode,
        None,
    )
    assert body["results"][0]["scene_id"] == str(target.id)
    assert body["results"][0]["video_id"] == str(target.video_id)
    assert (body["results"][0]["start_s"], body["results"][0]["end_s"]) == (target.start_s, target.end_s)
    assert body["results"] == as_json(read_path.run(world, owner, "the narwhal", mode=mode))


def test_a_person_search_answers_as_in_process(world, client):
    corpus, _ = world
    owner = corpus.owners[0]
    person = owner.persons[0]
    params = {"person_id": str(person.id), "limit": 3}
    response = client.get(URL, params=params, headers=bearer(token(owner_id=owner.id)))
    assert response.status_code == 200, response.text
    assert response.json()["person_id"] == str(person.id)
    assert response.json()["results"] == as_json(read_path.run(world, owner, "", person_id=person.id, limit=3))


def test_an_owner_scoped_token_never_gets_another_owners_scenes(world, client):
    corpus, _ = world
    for owner in corpus.owners:
        mine = {str(s.id) for v in owner.videos for s in v.scenes}
        headers = bearer(token("viewer", owner.id))
        for word in corpus.distinctive:
            response = client.get(URL, params={"q": word, "limit": 100}, headers=headers)
            assert response.status_code == 200, response.text
            assert {r["scene_id"] for r in response.json()["results"]} <= mine
        other = next(o for o in corpus.owners if o.id != owner.id)
        response = client.get(URL, params={"q": "narwhal", "owner_id": str(other.id)}, headers=headers)
        assert (response.status_code, response.json()) == (
            403,
            {"detail": f"this token may only search owner {owner.id}"},
        )
        same = client.get(URL, params={"q": "narwhal", "owner_id": str(owner.id)}, headers=headers)
        assert same.status_code == 200, same.text


def test_a_global_admin_names_the_owner_and_a_global_non_admin_is_refused(world, client):
    corpus, _ = world
    target = corpus.distinctive["zeppelin"]
    response = client.get(URL, params={"q": "zeppelin"}, headers=bearer(token()))
    assert (response.status_code, response.json()) == (
        400,
        {"detail": "this token is of scope 'global': pass owner_id=<uuid> to say whose scenes to search"},
    )
    named = client.get(URL, params={"q": "zeppelin", "owner_id": str(target.owner_id)}, headers=bearer(token()))
    assert named.status_code == 200, named.text
    assert named.json()["results"][0]["scene_id"] == str(target.id)
    response = client.get(URL, params={"q": "zeppelin", "owner_id": str(target.owner_id)}, headers=bearer(token("x")))
    assert (response.status_code, response.json()) == (
        403,
        {"detail": "a token of scope 'global' must be an admin's"},
    )


def test_an_empty_query_is_400_with_the_reason(world, client):
    corpus, _ = world
    headers = bearer(token(owner_id=corpus.owners[0].id))
    for params in ({"q": "   "}, {}):
        response = client.get(URL, params=params, headers=headers)
        assert (response.status_code, response.json()) == (
            400,
            {"detail": "empty query: give words to search for, or --person-id"},
        )


def test_a_person_of_another_owner_is_answered_like_an_unknown_one(world, client):
    corpus, _ = world
    mine, theirs = corpus.owners[0], corpus.owners[1]
    details = {}
    for person_id in (theirs.persons[0].id, uuid.uuid4()):
        params = {"q": "narwhal", "person_id": str(person_id)}
        response = client.get(URL, params=params, headers=bearer(token(owner_id=mine.id)))
        assert response.status_code == 400
        details[person_id] = response.json()["detail"].replace(str(person_id), "<id>")
    assert set(details.values()) == {f"person <id> not found for owner {mine.id}"}


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing bearer token"),
        (bearer("not-a-jwt"), "invalid token: Not enough segments"),
        (bearer(token(expires_in_s=-60)), "token expired"),
    ],
    ids=["none", "malformed", "expired"],
)
def test_a_request_without_a_valid_token_is_401(client, headers, detail):
    response = client.get(URL, params={"q": "narwhal"}, headers=headers)
    assert (response.status_code, response.json()) == (401, {"detail": detail})
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert SECRET not in response.text
    if headers:
        assert headers["Authorization"].split()[-1] not in response.text


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"mode": "fuzzy"}, "mode"),
        ({"person_id": "12345"}, "person_id"),
        ({"owner_id": "not-a-uuid"}, "owner_id"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
    ],
)
def test_malformed_parameters_are_422(world, client, params, field):
    corpus, _ = world
    response = client.get(URL, params={"q": "narwhal", **params}, headers=bearer(token(owner_id=corpus.owners[0].id)))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", field]


def test_an_unreachable_search_engine_or_database_is_a_503_naming_no_host(world, caplog):
    corpus, resources = world
    headers = bearer(token(owner_id=corpus.owners[0].id))
    port = free_port()  # nothing listens there
    no_engine = resources | {"search_index": SearchIndex(opensearch_url=f"http://ops:hunter2@127.0.0.1:{port}")}
    no_database = resources | {"db": AppDatabase(url=f"postgresql://ops:hunter2@127.0.0.1:{port}/heimdex")}
    with caplog.at_level(logging.WARNING, logger="heimdex_assets.api.app"):
        response = TestClient(create_app(no_engine, "http://127.0.0.1:1/graphql", SECRET)).get(
            URL, params={"q": "narwhal", "mode": "lexical"}, headers=headers
        )
        assert_unavailable(response, "the search index", "127.0.0.1", str(port), "ops", "hunter2")
        response = TestClient(create_app(no_database, "http://127.0.0.1:1/graphql", SECRET)).get(
            URL, params={"q": "narwhal", "mode": "semantic"}, headers=headers
        )
        assert_unavailable(response, "the application database", "127.0.0.1", str(port), "ops", "hunter2")
    logged = [r.getMessage() for r in caplog.records if r.name == "heimdex_assets.api.app"]
    assert logged[0] == (
        f"GET {URL} answered 503, the search index unavailable: "
        f"cannot reach OpenSearch at http://127.0.0.1:{port}: ConnectionError"
    )
    assert logged[1].startswith(
        f"GET {URL} answered 503, the application database unavailable: "
        f"cannot reach the application database at postgresql+psycopg://ops:***@127.0.0.1:{port}/heimdex: "
    )
    assert "hunter2" not in "".join(logged)
