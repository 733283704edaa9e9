"""docker/: the compose files, the instance files and, on request, the whole stack run for real.

The file checks run everywhere (no Docker needed). ``scripts/docker-smoke.sh`` (images, stack, a
reprocess whose runs each get a container of Dagster's Docker run launcher) takes about 12 minutes
the first time, so it runs only with ``HEIMDEX_DOCKER_SMOKE=1`` and a Docker engine that answers.
"""

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema_rs  # with schemathesis (dev extra)
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import ConfigurableClassData

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVICES = {"postgres", "opensearch", "user-code", "webserver", "daemon", "admin-api"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _launcher(instance_file: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> object:
    """The run launcher the instance file configures, validated against Dagster's own schemas."""
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://u:p@127.0.0.1:1/dagster")
    shutil.copy(DOCKER / instance_file, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    launcher = config["run_launcher"]
    return ConfigurableClassData(launcher["module"], launcher["class"], yaml.safe_dump(launcher["config"])).rehydrate(
        as_type=object
    )


def test_production_compose_services_and_bindings():
    compose = _yaml("docker-compose.yml")
    services = compose["services"]
    assert set(services) == SERVICES
    assert "name" not in compose  # docker-compose 1.x refuses it; the project name is given with -p
    # The webserver has no authentication: published on the loopback interface only.
    assert services["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["daemon"]["volumes"]
    assert services["user-code"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_local_override_puts_every_started_service_on_the_host_network():
    local = _yaml("docker-compose.local.yml")
    started = SERVICES - {"opensearch"}  # the SQLite index stands in for it
    assert set(local["services"]) == started
    assert all(local["services"][s]["network_mode"] == "host" for s in started)
    assert local["networks"]["default"] == {"name": "host", "external": True}  # no bridge network created
    for service in ("webserver", "admin-api", "user-code"):
        assert "127.0.0.1" in local["services"][service]["command"]


@pytest.mark.parametrize(
    ("instance_file", "compose_files", "network"),
    [
        ("dagster.yaml", ["docker-compose.yml"], "heimdex"),
        ("dagster.local.yaml", ["docker-compose.yml", "docker-compose.local.yml"], "host"),
    ],
)
def test_run_launcher_config_is_valid_and_its_env_vars_are_set_on_the_daemon(
    instance_file, compose_files, network, monkeypatch, tmp_path
):
    launcher = _launcher(instance_file, monkeypatch, tmp_path)
    assert type(launcher).__name__ == "DockerRunLauncher"
    assert launcher.networks == [network]
    # DockerRunLauncher raises at launch for a listed variable the daemon lacks: each must be set there.
    daemon_env: dict = {}
    for name in compose_files:
        daemon_env |= _yaml(name)["services"]["daemon"]["environment"]
    missing = [v for v in launcher.env_vars if v.split("=")[0] not in daemon_env]
    assert not missing, f"{instance_file} passes {missing} to run containers but the daemon's environment lacks them"


@pytest.mark.skipif(
    os.environ.get("HEIMDEX_DOCKER_SMOKE") != "1",
    reason="set HEIMDEX_DOCKER_SMOKE=1 to run "
    "scripts/docker-smoke.sh (about 12 minutes: images, stack, a run per container)",
)
def test_docker_smoke():
    if not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine answers `docker info`")
    done = subprocess.run([str(ROOT / "scripts" / "docker-smoke.sh")], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK: every run of the reprocess ran in a container of its own" in done.stdout


HELM = ROOT / "deploy" / "helm"
K8S_DEFINITIONS = "https://kubernetesjsonschema.dev/"


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _without_required(node: object) -> object:
    """The schema less its `required` lists: Helm checks user values merged over the chart's defaults, which
    supply those (a values file sets only what it changes)."""
    if isinstance(node, dict):
        return {k: _without_required(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [_without_required(v) for v in node]
    return node


def test_helm_values_fit_the_chart_schema_with_the_k8s_launcher_and_the_docker_limits():
    """deploy/helm/values.yaml against the Dagster chart's values.schema.json, vendored from dagster-io/dagster
    (helm/dagster/values.schema.json at commit bdb8547f, the newest the search index holds: it predates the chart's
    `concurrency` values and typed `runRetries`, checked here against docker/dagster.yaml instead)."""
    values = yaml.safe_load((HELM / "values.yaml").read_text())
    schema = json.loads((HELM / "dagster-chart-schema" / "values.schema.json").read_text())
    # The Kubernetes object schemas it points at are not vendored: accept-anything stand-ins at each pointer.
    stand_in: dict = {}
    for ref in _refs(schema):
        if ref.startswith(K8S_DEFINITIONS):
            node = stand_in
            for part in ref.split("#/", 1)[1].split("/"):
                node = node.setdefault(part, {})
    validator = jsonschema_rs.Draft7Validator(_without_required(schema), retriever=lambda uri: stand_in)
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(values)]
    assert errors == []

    docker = _yaml("dagster.yaml")
    daemon = values["dagsterDaemon"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert daemon["runCoordinator"]["type"] == docker["run_coordinator"]["class"] == "QueuedRunCoordinator"
    # The run limit is under `concurrency` only: the chart refuses it in both places.
    assert "maxConcurrentRuns" not in daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert values["concurrency"] == {
        "enabled": True,
        "runs": {"maxConcurrentRuns": docker["concurrency"]["runs"]["max_concurrent_runs"]},
        "pools": {
            "granularity": docker["concurrency"]["pools"]["granularity"],
            "defaultLimit": docker["concurrency"]["pools"]["default_limit"],
        },
    }

    def camel(snake: str) -> str:
        first, *rest = snake.split("_")
        return first + "".join(word.title() for word in rest)

    assert daemon["runRetries"] == {camel(k): v for k, v in docker["run_retries"].items()}
    # maxResumeRunAttempts 0 is Dagster's default, which Docker's file leaves as it is: no resume, a retry instead.
    assert daemon["runMonitoring"] == {camel(k): v for k, v in docker["run_monitoring"].items()} | {
        "maxResumeRunAttempts": 0
    }
