"""``heimdex reprocess`` on a deployment: backfills launched through a real dagster-webserver and run
by a real dagster-daemon (backfill daemon, queued run coordinator), against the test database."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import httpx
import pytest
from sqlalchemy import select, update

from heimdex_assets.assets import DERIVED_ASSETS, OWNER_ASSETS, SOURCE_ASSETS, VIDEO_ASSETS
from heimdex_assets.backfills import BackfillError, backfill_status
from heimdex_assets.cli import main
from heimdex_assets.db.tables import scene_clip_vectors, scene_search_documents, scene_text_vectors, scenes
from heimdex_assets.jobs import reprocess_job
from heimdex_assets.models import expected_models
from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
from heimdex_assets.resources import BlobStore, OpenCvPersonDetector, SearchIndex
from heimdex_assets.resources.clip_embedder import TINY_MODEL
from heimdex_assets.runs import FORCE_TAG, OWNER_SCOPE_TAG
from heimdex_assets.sensors.stale_partitions import stale_partitions_sensor
from heimdex_assets.settings import resources_from_env
from heimdex_assets.spec import SPEC
from heimdex_assets_tests.conftest import materialize_videos

BIN = Path(sys.executable).parent  # the venv's dagster-webserver and dagster-daemon
REPO = Path(__file__).resolve().parents[1]
WEBSERVER_START_S = 120
BACKFILL_DONE_S = 240
_WORKSPACE_STATUS = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A Dagster deployment of the code location in a temp DAGSTER_HOME: webserver and daemon as processes."""

    def __init__(self, tmp_path: Path, database_url: str, clip_checkpoint: Path) -> None:
        self.home = tmp_path / "dagster-home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(
            "telemetry:\n  enabled: false\n"
            "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: QueuedRunCoordinator\n"
            "  config:\n    dequeue_interval_seconds: 1\n"
        )
        self.workspace = tmp_path / "workspace.yaml"
        self.workspace.write_text(
            "load_from:\n  - python_module:\n      module_name: heimdex_assets.definitions\n"
            f"      location_name: heimdex_assets\n      working_directory: {REPO}\n"
        )
        self.env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "HEIMDEX_OPENSEARCH_URL")}
        self.env |= {
            "DAGSTER_HOME": str(self.home),
            "HEIMDEX_HOME": str(tmp_path / "heimdex-home"),
            "HEIMDEX_BLOB_ROOTS": str(tmp_path),  # the tests' media (rows) is written under tmp_path
            # The tests drive the stale sensor's ticks themselves; the daemon must not tick it behind them.
            "HEIMDEX_STALE_SENSOR_DEFAULT": "stopped",
            "HEIMDEX_DATABASE_URL": database_url,
            "HEIMDEX_SEARCH_SQLITE_PATH": str(tmp_path / "search" / "scenes.sqlite"),
            "HEIMDEX_CLIP_MODEL": TINY_MODEL,
            "HEIMDEX_CLIP_CHECKPOINT": str(clip_checkpoint),
            "HEIMDEX_CLIP_DEVICE": "cpu",
            "HEIMDEX_TEXT_PROVIDER": "local",
            "HF_HUB_OFFLINE": "1",
        }
        self.graphql_url = f"http://127.0.0.1:{free_port()}/graphql"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            # Own process group: stopping it stops the code servers and run workers it spawned.
            self.processes[name] = subprocess.Popen(
                argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def start_webserver(self) -> None:
        """Start dagster-webserver and wait until it has loaded the code location."""
        port = httpx.URL(self.graphql_url).port
        argv = [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(self.workspace)]
        self._start("webserver", argv)
        deadline = time.monotonic() + WEBSERVER_START_S
        while time.monotonic() < deadline:
            assert self.processes["webserver"].poll() is None, f"webserver exited:\n{self.log_tail('webserver')}"
            try:
                data = httpx.post(self.graphql_url, json={"query": _WORKSPACE_STATUS}, timeout=5).json()["data"]
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.5)
                continue
            entries = data["workspaceOrError"].get("locationEntries") or []
            if entries and entries[0]["loadStatus"] == "LOADED":
                error = entries[0]["locationOrLoadError"]
                assert error["__typename"] != "PythonError", f"code location failed to load: {error['message']}"
                return
            time.sleep(0.5)
        pytest.fail(
            f"the webserver did not load the code location in {WEBSERVER_START_S} s:\n{self.log_tail('webserver')}"
        )

    def start_daemon(self) -> None:
        self._start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)])

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            # Whatever the group leader left behind (a code server, a run worker) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path: Path, database_url: str, tiny_clip_checkpoint: Path) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path, database_url, tiny_clip_checkpoint)
    try:
        yield deployment
    finally:
        deployment.stop()


def wait_for_backfills(deployment: Deployment, backfill_ids: list[str]) -> dict[str, dict]:
    deadline = time.monotonic() + BACKFILL_DONE_S
    statuses: dict[str, dict] = {}
    while time.monotonic() < deadline:
        statuses = {b: backfill_status(deployment.graphql_url, b) for b in backfill_ids}
        if all(s["done"] for s in statuses.values()):
            return statuses
        assert deployment.processes["daemon"].poll() is None, f"daemon exited:\n{deployment.log_tail('daemon')}"
        time.sleep(1)
    pytest.fail(f"backfills not done in {BACKFILL_DONE_S} s: {statuses}\n{deployment.log_tail('daemon')}")


def test_heimdex_reprocess_launches_backfills_that_the_daemon_runs_for_one_owner_only(
    deployment, db, rows, clip, text_embedder, monkeypatch, capsys
):
    a, b = rows.owner("a"), rows.owner("b")
    videos_a = [rows.video(a, n_scenes=2), rows.video(a, n_scenes=2)]
    rows.video(b, n_scenes=2)
    with db.engine.connect() as conn:
        scenes_a = set(conn.execute(select(scenes.c.id).where(scenes.c.owner_id == a)).scalars())
    # The CLI plans with the same configuration as the code location, and launches on its webserver.
    for name, value in deployment.env.items():
        if name.startswith("HEIMDEX_"):
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HEIMDEX_DAGSTER_GRAPHQL_URL", deployment.graphql_url)

    deployment.start_webserver()
    instance = dg.DagsterInstance.from_config(str(deployment.home))
    # One video registered as discovery would; the other not yet: the launch must add it.
    instance.add_dynamic_partitions("videos", [str(videos_a[0])])
    started = time.monotonic()
    code = main(["reprocess", "--scope", "owner", "--owner-id", str(a), "--force", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    launched = json.loads(out)["backfills"]
    assert set(instance.get_dynamic_partitions("videos")) == {str(v) for v in videos_a}
    assert instance.get_dynamic_partitions("owners") == [str(a)]
    assert {tuple(sorted(lb["assets"])): lb["partitions"] for lb in launched} == {
        ("scene_clip_embeddings", "scene_person_embeddings", "scene_search_index", "scene_text_embeddings"): 2,
        ("person_photo_embeddings", "person_query_embeddings"): 1,
    }

    deployment.start_daemon()
    statuses = wait_for_backfills(deployment, [lb["backfill_id"] for lb in launched])
    print(f"backfills done {time.monotonic() - started:.1f} s after launch")
    for launched_backfill in launched:
        status = statuses[launched_backfill["backfill_id"]]
        assert status["status"] == "COMPLETED_SUCCESS", status
        assert status["failed"] == 0 and status["completed"] == status["requested"]
        assert status["requested"] == len(launched_backfill["assets"]) * launched_backfill["partitions"]

    def owner_rows(table, owner):
        with db.engine.connect() as conn:
            return conn.execute(select(table).where(table.c.owner_id == owner)).all()

    text_rows, clip_rows = owner_rows(scene_text_vectors, a), owner_rows(scene_clip_vectors, a)
    assert {r.scene_id for r in text_rows} == scenes_a == {r.scene_id for r in clip_rows}
    assert {(r.step_version, r.model_id) for r in text_rows} == {
        (SPEC.step("scene_text").version, text_embedder.model_id)
    }
    assert {(r.step_version, r.model_id) for r in clip_rows} == {(SPEC.step("scene_clip").version, clip.model_id)}
    assert {r.scene_id for r in owner_rows(scene_search_documents, a)} == scenes_a
    for table in (scene_text_vectors, scene_clip_vectors, scene_search_documents):
        assert owner_rows(table, b) == []
    with db.engine.connect() as conn:
        fresh = plan_reprocess(
            conn,
            ReprocessRequest(scope="owner", owner_id=a),
            expected_models(conn, resources_from_env(deferred=False)),
        )
    assert fresh.empty

    for launched_backfill in launched:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": launched_backfill["backfill_id"]}))
        # One run over the range of partitions, for all the group's assets: never a run per video.
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert set(runs[0].asset_selection) == {dg.AssetKey(k) for k in launched_backfill["assets"]}
        assert (runs[0].tags.get(OWNER_SCOPE_TAG), runs[0].tags.get(FORCE_TAG)) == (str(a), "true")
    with pytest.raises(BackfillError, match=r"^Dagster has no backfill nonesuch$"):
        backfill_status(deployment.graphql_url, "nonesuch")


def test_heimdex_reprocess_wait_follows_its_backfills_to_the_end(deployment, rows, monkeypatch, capsys):
    owner = rows.owner()
    rows.video(owner, n_scenes=3)
    rows.video(owner, n_scenes=2)
    for name, value in deployment.env.items():
        if name.startswith("HEIMDEX_"):
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HEIMDEX_DAGSTER_GRAPHQL_URL", deployment.graphql_url)
    deployment.start_webserver()
    deployment.start_daemon()
    argv = ["reprocess", "--scope", "owner", "--owner-id", str(owner), "--wait", "--json"]

    code = main([*argv, "--timeout", str(BACKFILL_DONE_S)])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)  # stdout: the JSON alone, with each backfill's final state
    assert {(b["status"], b["failed"]) for b in result["backfills"]} == {("COMPLETED_SUCCESS", 0)}
    assert result["message"].endswith("; all completed")
    # stderr (not a terminal): plain progress lines over the 10 asset partitions, the last one complete.
    lines = err.splitlines()
    assert lines[0].startswith("[") and "/10 partitions" in lines[0]
    assert re.search(r"100%  10/10 partitions, [\d.]+ scenes/s, done in \d+", lines[-1]), err

    # Launched just now, not done at once: --timeout 0 gives up following and says where to look.
    code = main([*argv, "--force", "--timeout", "0"])
    out, err = capsys.readouterr()
    ui = deployment.graphql_url.removesuffix("/graphql")
    assert (code, out) == (1, "")
    assert re.search(
        rf"^heimdex: error: backfill\(s\) \S+, \S+ still running after --timeout 0 s; they continue on Dagster: "
        rf"follow them at {re.escape(ui)}/runs/b/\S+ {re.escape(ui)}/runs/b/\S+$",
        err.splitlines()[-1],
    ), err


def test_the_reprocess_job_backfills_exactly_the_stale_partitions_and_the_sensor_waits_for_it(
    deployment, db, rows, clip, text_embedder
):
    """Edited transcripts make two videos stale; the Launchpad's ``reprocess`` job submits one backfill of
    exactly them, which the sensor then leaves alone, and which the daemon runs to fresh."""
    owner = rows.owner()
    videos = [str(rows.video(owner, n_scenes=2)) for _ in range(3)]
    resources = {
        "db": db,
        "clip": clip,
        "text_embedder": text_embedder,
        "blobs": BlobStore(allowed_roots=[str(rows.media)]),
        "person_detector": OpenCvPersonDetector(),
        "search_index": SearchIndex(sqlite_path=deployment.env["HEIMDEX_SEARCH_SQLITE_PATH"]),
    }
    instance = dg.DagsterInstance.from_config(str(deployment.home))
    materialize_videos(VIDEO_ASSETS, videos, resources, instance)
    instance.add_dynamic_partitions("owners", [str(owner)])
    dg.materialize(OWNER_ASSETS, partition_key=str(owner), resources=resources, instance=instance)
    with db.transaction() as conn:
        conn.execute(update(scenes).where(scenes.c.video_id.in_(videos[1:])).values(transcript="A new narration."))

    defs = dg.Definitions(
        assets=[*SOURCE_ASSETS, *DERIVED_ASSETS],
        jobs=[reprocess_job],
        sensors=[stale_partitions_sensor],
        resources=resources,
    )
    job = defs.get_job_def("reprocess")

    def reprocess(**config) -> dg.ExecuteInProcessResult:
        run_config = {"ops": {"reprocess_op": {"config": config}}}
        return job.execute_in_process(run_config=run_config, instance=instance)

    def tick() -> dg.SensorResult:
        sensor_resources = {k: v for k, v in resources.items() if k != "blobs"}
        with dg.build_sensor_context(instance=instance, resources=sensor_resources, definitions=defs) as context:
            return stale_partitions_sensor.evaluate_tick(context)

    dry = reprocess(scope="all", dry_run=True)
    assert dry.output_for_node("reprocess_op") == [] and instance.get_backfills() == []
    output = next(e for e in dry.all_node_events if e.is_successful_output)
    metadata = output.step_output_data.metadata  # the plan, shown in the UI
    assert metadata["backfills"].value == 1 and metadata["backfill_partitions"].value == [2]

    (backfill_id,) = reprocess(scope="owner", owner_id=str(owner)).output_for_node("reprocess_op")
    (backfill,) = instance.get_backfills()
    targets = {
        (p.asset_key.to_user_string(), p.partition_key)
        for p in backfill.asset_backfill_data.target_subset.iterate_asset_partitions()
    }
    assert backfill.backfill_id == backfill_id
    assert targets == {(a, v) for a in ("scene_text_embeddings", "scene_search_index") for v in videos[1:]}
    assert backfill.tags[OWNER_SCOPE_TAG] == str(owner)

    # Queued, not running yet (no daemon): the sensor requests nothing, and asks the instance, not a timer.
    queued = tick()
    assert not queued.run_requests and "queued or running backfill" in queued.skip_message

    deployment.start_daemon()
    deadline = time.monotonic() + BACKFILL_DONE_S
    while (status := instance.get_backfill(backfill_id).status.value) == "REQUESTED":
        assert time.monotonic() < deadline, f"backfill not done in {BACKFILL_DONE_S} s\n{deployment.log_tail('daemon')}"
        time.sleep(1)
    assert status == "COMPLETED_SUCCESS", deployment.log_tail("daemon")
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    assert len(runs) == 1  # one run's worth of scenes: one run
    assert tick().skip_message == "every partition is fresh"
