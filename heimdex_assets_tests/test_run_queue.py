"""The production run queue and run retries (docker/dagster.yaml), watched on a real dagster-daemon.

The instance keeps docker/dagster.yaml's ``run_coordinator``, ``concurrency`` and ``run_retries`` sections as they
are, but for the test's PostgreSQL (a database of its own), the default run launcher (a process per run, where
production starts a container) and ``max_concurrent_runs`` lowered to 1. The runs come from
heimdex_assets_tests/queue_location.py: they hold until released, have their worker killed, or fail.
"""

import os
import signal
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEventType
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RETRY_NUMBER_TAG, RUN_FAILURE_REASON_TAG, WILL_RETRY_TAG
from dagster_graphql import DagsterGraphQLClient
from sqlalchemy import create_engine, make_url, text

from heimdex_assets_tests.test_backfills import REPO, Deployment, free_port

T = TypeVar("T")
PRODUCTION_INSTANCE = REPO / "docker" / "dagster.yaml"
DAGSTER_DATABASE = "heimdex_dagster_run_queue_test"
WAIT_S = 60  # for any one step of the scenario (a run's worker starts in a few seconds)
NOT_RETRIED_FOR_ASSET_FAILURE = "Not retrying run since it failed due to an asset or op failure"
Status = dg.DagsterRunStatus


def instance_config(dagster_storage_url: str) -> dict:
    """docker/dagster.yaml's queue, concurrency and run retry sections, on the test's storage and launcher."""
    production = yaml.safe_load(PRODUCTION_INSTANCE.read_text())
    config = {section: production[section] for section in ("run_coordinator", "concurrency", "run_retries")}
    config["concurrency"]["runs"]["max_concurrent_runs"] = 1  # one at a time: the second run must queue
    config["run_coordinator"].setdefault("config", {})["dequeue_interval_seconds"] = 1  # test speed only
    config["storage"] = {"postgres": {"postgres_url": dagster_storage_url}}
    config["telemetry"] = {"enabled": False}
    return config  # no run_launcher: the default one, a run worker process per run


class QueueDeployment(Deployment):
    """dagster-webserver and dagster-daemon serving the test code location, with the instance above."""

    def __init__(self, tmp_path: Path, dagster_storage_url: str) -> None:
        self.home = tmp_path / "dagster-home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(instance_config(dagster_storage_url)))
        self.workspace = tmp_path / "workspace.yaml"
        self.workspace.write_text(
            "load_from:\n  - python_module:\n      module_name: heimdex_assets_tests.queue_location\n"
            f"      location_name: queue_location\n      working_directory: {REPO}\n"
        )
        self.runs_dir = tmp_path / "runs"  # where held runs write their worker's pid and wait for release
        self.runs_dir.mkdir()
        self.port = free_port()
        self.graphql_url = f"http://127.0.0.1:{self.port}/graphql"
        self.env = os.environ | {
            "DAGSTER_HOME": str(self.home),
            "QUEUE_TEST_DIR": str(self.runs_dir),
            # The run retry daemon looks for failed runs every second instead of every 5 (test speed only).
            "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1",
        }
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.processes = {}

    def worker_pid(self, run_id: str) -> int | None:
        """The pid of the run's worker once its op runs (None before)."""
        path = self.runs_dir / f"{run_id}.pid"
        content = path.read_text() if path.exists() else ""
        return int(content) if content else None

    def release(self, run_id: str) -> None:
        (self.runs_dir / f"{run_id}.release").touch()


@pytest.fixture
def dagster_storage_url(database_url: str) -> Iterator[str]:
    """A fresh database for Dagster's storage on the test server, dropped afterwards."""
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    drop = text(f"DROP DATABASE IF EXISTS {DAGSTER_DATABASE} WITH (FORCE)")
    with admin.connect() as conn:
        conn.execute(drop)
        conn.execute(text(f"CREATE DATABASE {DAGSTER_DATABASE}"))
    # Dagster's storage wants the psycopg2 scheme (see docker/dagster.yaml).
    url = make_url(database_url).set(drivername="postgresql+psycopg2", database=DAGSTER_DATABASE)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(drop)
    admin.dispose()


@pytest.fixture
def deployment(tmp_path: Path, dagster_storage_url: str) -> Iterator[QueueDeployment]:
    deployment = QueueDeployment(tmp_path, dagster_storage_url)
    try:
        yield deployment
    finally:
        deployment.stop()


def test_runs_beyond_the_limit_queue_and_only_a_dead_worker_is_retried(deployment):
    started = time.monotonic()
    with dg.DagsterInstance.from_config(str(deployment.home)) as instance:
        instance.get_runs(limit=1)  # the storage's tables are created here, before two processes race for it
        deployment.start_webserver()
        deployment.start_daemon()
        client = DagsterGraphQLClient("127.0.0.1", port_number=deployment.port)

        def wait(what: str, check: Callable[[], T | None]) -> T:
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                if (value := check()) is not None and value is not False:
                    return value
                assert deployment.processes["daemon"].poll() is None, f"daemon exited:\n{deployment.log_tail('daemon')}"
                time.sleep(0.2)
            pytest.fail(f"{what}: not within {WAIT_S} s\n{deployment.log_tail('daemon', 60)}")

        def status(run_id: str) -> Status:
            return instance.get_run_by_id(run_id).status

        def tag(run_id: str, key: str) -> str:
            """A tag the instance adds just after the run's status changed."""
            return wait(f"tag {key} on run {run_id}", lambda: instance.get_run_by_id(run_id).tags.get(key))

        def retry_of(run_id: str) -> dg.DagsterRun | None:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={PARENT_RUN_ID_TAG: run_id}))
            return runs[0] if runs else None

        def kill_worker(run_id: str) -> None:
            """SIGKILL the run's worker mid-op, as an OOM kill or a lost node would."""
            os.kill(wait(f"run {run_id} started", lambda: deployment.worker_pid(run_id)), signal.SIGKILL)
            wait(f"run {run_id} seen failed", lambda: status(run_id) == Status.FAILURE)

        a, b = client.submit_job_execution("hold_job"), client.submit_job_execution("hold_job")
        failing = client.submit_job_execution("fail_job")

        # (a) The limit holds: a runs, b and the failing run stay queued over several dequeue ticks.
        wait("the first run started", lambda: deployment.worker_pid(a))
        for _ in range(15):
            assert (status(a), status(b), status(failing)) == (Status.STARTED, Status.QUEUED, Status.QUEUED)
            time.sleep(0.2)

        # (b) a's worker is killed: the run fails as a crash (no step failure), and the daemon retries it
        # with a new run that queues like any other, behind b and the failing run.
        kill_worker(a)
        assert tag(a, WILL_RETRY_TAG) == "true"
        assert instance.get_run_by_id(a).tags.get(RUN_FAILURE_REASON_TAG) != "STEP_FAILURE"
        a1 = wait("a retry of the killed run", lambda: retry_of(a))
        assert a1.tags[RETRY_NUMBER_TAG] == "1"
        wait("b started", lambda: deployment.worker_pid(b))
        assert (status(a1.run_id), status(failing)) == (Status.QUEUED, Status.QUEUED)
        deployment.release(b)

        # The asset failure is not retried (retry_on_asset_or_op_failure: false), as the daemon reports.
        wait("the failing run failed", lambda: status(failing) == Status.FAILURE)
        assert (tag(failing, WILL_RETRY_TAG), tag(failing, RUN_FAILURE_REASON_TAG)) == ("false", "STEP_FAILURE")
        wait(
            "the daemon's word on the asset failure",
            lambda: any(
                (e.message or "").startswith(NOT_RETRIED_FOR_ASSET_FAILURE)
                for e in instance.all_logs(failing, of_type=DagsterEventType.ENGINE_EVENT)
            ),
        )

        # max_retries: 2. The retry's worker dies too: one more retry; when that one dies, none.
        kill_worker(a1.run_id)
        a2 = wait("a second retry", lambda: retry_of(a1.run_id))
        assert a2.tags[RETRY_NUMBER_TAG] == "2"
        kill_worker(a2.run_id)
        assert tag(a2.run_id, WILL_RETRY_TAG) == "false"
        time.sleep(3)  # three more ticks of the retry daemon: it launches nothing else

        runs = {r.run_id: r for r in instance.get_runs()}
        assert {run_id: r.status for run_id, r in runs.items()} == {
            a: Status.FAILURE,
            b: Status.SUCCESS,
            failing: Status.FAILURE,
            a1.run_id: Status.FAILURE,
            a2.run_id: Status.FAILURE,
        }
        assert retry_of(b) is None and retry_of(failing) is None
        # Never two runs at once: each started after the one before it ended.
        records = sorted(instance.get_run_records(), key=lambda r: r.start_time)
        for before, after in pairwise(records):
            assert after.start_time >= before.end_time, (before.dagster_run.run_id, after.dagster_run.run_id)
    print(f"run queue scenario: {time.monotonic() - started:.1f} s")
