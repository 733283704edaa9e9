"""Schema fuzzing of the API, in process: Schemathesis generates valid and invalid requests for every
operation of the app's own OpenAPI, against the real database and a real dagster-webserver; no answer
may be a 5xx, carry a traceback, or name a secret or an internal host."""

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from heimdex_assets.api import TokenBuckets, create_app
from heimdex_assets.resources import SearchIndex
from heimdex_assets_tests.api.test_admin_api import SECRET, token
from heimdex_assets_tests.test_backfills import Deployment

MAX_EXAMPLES = 25  # per operation and mode: a few seconds in all


@pytest.fixture(scope="module")
def webserver(tmp_path_factory, database_url, tiny_clip_checkpoint):
    deployment = Deployment(tmp_path_factory.mktemp("fuzz"), database_url, tiny_clip_checkpoint)
    try:
        deployment.start_webserver()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def api(resources, tmp_path, webserver):
    search_index = SearchIndex(sqlite_path=str(tmp_path / "search.sqlite"))
    # The rate limit has its own test; here it would only turn every POST after the tenth into a 429.
    return create_app(resources | {"search_index": search_index}, webserver.graphql_url, SECRET, TokenBuckets(10**6))


def operations(app) -> list:
    """The app's operations as Schemathesis reads its OpenAPI."""
    return [result.ok() for result in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()]


# Schemathesis' own pytest integration (from_fixture) does not run under pytest 9, so each operation's
# strategy is driven by Hypothesis directly.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_no_request_gets_a_5xx_a_traceback_or_a_secret(api, webserver, database_url, mode):
    bearer = token()
    hidden = (SECRET, bearer, "Traceback", webserver.graphql_url, database_url, "127.0.0.1")

    for operation in operations(api):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_cleanly(case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {bearer}"})
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text}"
            if response.status_code >= 400:
                assert "detail" in response.json(), f"{where}: {response.text}"
            for secret in hidden:
                assert secret not in response.text, f"{where} answered {secret!r}"

        answers_cleanly()


def test_the_openapi_documents_bearer_auth_on_every_operation(api):
    spec = TestClient(api).get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"HTTPBearer": {"type": "http", "scheme": "bearer"}}
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert len(operations) == 7  # search, reprocess (+ progress), plans (+ approve), spec, generations
    assert all(op["security"] == [{"HTTPBearer": []}] for op in operations)
