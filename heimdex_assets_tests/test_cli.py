"""The ``heimdex`` command end to end: demo on the defaults (embedded search, placeholder CLIP), status, search."""

import json
import os
import re
import socket
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import text

from heimdex_assets.cli import main
from heimdex_assets.demo import demo_id
from heimdex_assets_tests.conftest import ALL_TABLES


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo_env(database_url, tmp_path_factory):
    """Environment of a user who points HEIMDEX_DATABASE_URL at a server and keeps every default."""
    home = tmp_path_factory.mktemp("heimdex-home")
    return {
        "HEIMDEX_DATABASE_URL": database_url,
        "HEIMDEX_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
    }


@pytest.fixture
def env(demo_env, monkeypatch):
    for name in ("OPENAI_API_KEY", "HEIMDEX_OPENSEARCH_URL", "HEIMDEX_CLIP_CHECKPOINT", "HEIMDEX_TEXT_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in demo_env.items():
        monkeypatch.setenv(name, value)
    return demo_env


def test_demo_materialises_all_six_assets_twice_to_the_same_state(env, capsys, db):
    code, out, err = run_cli(capsys, "demo", "--videos-per-owner", "2", "--scenes", "5")
    assert code == 0, err
    assert "note: CLIP weights ViT-B-32/openai could not be loaded" in out  # said once, in one line
    assert "the demo uses placeholder CLIP weights (open_clip:tiny-random)" in out
    assert sum("CLIP weights" in line for line in out.splitlines()) == 1
    assert "scene_search (documents)     30" in out
    # Progress per phase on stderr: the 6 READY videos (with their 30 scenes), then the 3 owners.
    assert re.search(r"^\[#+\] 100%  6/6 partitions, [\d.]+ scenes/s, done in \d+s  videos$", err, re.M), err
    assert re.search(r"^\[#+\] 100%  3/3 partitions, done in \d+s  owners$", err, re.M), err

    def state():
        with db.engine.connect() as conn:
            return {
                t: conn.execute(
                    text(f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {t} t")
                ).one()
                for t in (
                    "scene_text_vectors",
                    "scene_clip_vectors",
                    "scene_person_vectors",
                    "person_photo_vectors",
                    "person_query_vectors",
                    "scene_search_documents",
                    "person_reference_photos",
                )
            }

    first = state()
    code, out, err = run_cli(capsys, "demo", "--videos-per-owner", "2", "--scenes", "5", "--json")
    summary = json.loads(out)
    assert code == 0 and state() == first
    assert summary["videos_ready"] == 6 and summary["scenes"] == 35  # + the PROCESSING video's 5
    assert summary["vectors"] == {
        "scene_text/transcript": 30,
        "scene_text/visual": 30,
        "scene_clip": 30,
        "scene_person (detections)": summary["vectors"]["scene_person (detections)"],
        "person_photo (READY photos)": 12,
        "person_query": 6,
        "scene_search (documents)": 30,
    }
    assert summary["vectors"]["scene_person (detections)"] >= 6  # every real photograph of a person
    assert summary["models"]["clip"] == ["open_clip:tiny-random"]
    assert summary["search_index_active_version"] == "2026-01-06"

    code, out, _ = run_cli(capsys, "status", "--json")
    status = json.loads(out)
    assert code == 0
    for asset in ("scene_text_embeddings", "scene_clip_embeddings", "scene_person_embeddings", "scene_search_index"):
        assert status["assets"][asset]["partitions"] == {"fresh": 6, "stale": 0, "missing": 0, "failed": 0}
    for asset in ("person_photo_embeddings", "person_query_embeddings"):
        assert status["assets"][asset]["partitions"] == {"fresh": 3, "stale": 0, "missing": 0, "failed": 0}

    # The demo recorded its placeholder CLIP; a CLI that leaves CLIP unconfigured follows that record.
    assert status["assets"]["scene_clip_embeddings"]["model_id"] == "open_clip:tiny-random"
    assert status["assets"]["scene_clip_embeddings"]["configured_model_id"] == "open_clip:tiny-random"
    code, out, _ = run_cli(capsys, "models", "--json")
    assert json.loads(out)["steps"]["scene_clip"] == {
        "deployment": "open_clip:tiny-random",
        "recorded_by": "heimdex demo",
        "configured": "open_clip:tiny-random",
    }

    owner = demo_id("owner/0")
    code, out, _ = run_cli(capsys, "search", "--owner-id", str(owner), "narwhal", "--json", "--mode", "lexical")
    results = json.loads(out)["results"]
    assert code == 0 and "narwhal" in results[0]["snippet"]
    code, out, _ = run_cli(capsys, "search", "--owner-id", str(demo_id("owner/1")), "narwhal", "--mode", "lexical")
    assert out.strip() == "no results"

    # Reprocessing: nothing to do after the demo; forced for one owner it redoes that owner only.
    code, out, _ = run_cli(capsys, "reprocess", "--scope", "all", "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["message"] == "nothing to do: every partition is fresh"
    assert all(a["partitions"] == 0 for a in plan["assets"].values())
    code, out, err = run_cli(
        capsys, "reprocess", "--scope", "owner", "--owner-id", str(owner), "--force", "--sync", "--json"
    )
    done = json.loads(out)
    assert code == 0, err
    assert done["video_count"] == 2 and done["assets"]["scene_clip_embeddings"]["partitions"] == 2
    assert done["assets"]["person_query_embeddings"]["partitions"] == 1 and done["failed_runs"] == []
    after = state()
    assert {t: n for t, (n, _) in after.items()} == {t: n for t, (n, _) in first.items()}
    # Text comes from the cache and documents are unchanged: identical rows. CLIP floats may differ in
    # the last bits with another batch composition, so those are compared by count only.
    for table in ("scene_text_vectors", "scene_search_documents", "person_reference_photos"):
        assert after[table] == first[table]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--owner-id", "42", "x"], "heimdex: error: malformed owner id '42'"),
        (["search", "--owner-id", "3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70", "  "], "heimdex: error: empty query"),
        (["reprocess", "--scope", "video", "--dry-run"], "heimdex: error: scope video needs a video id"),
        (["reprocess", "--scope", "all", "--since", "yesterday", "--dry-run"], "heimdex: error: malformed --since"),
    ],
)
def test_bad_input_gets_one_line_on_stderr(env, capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_reprocess_names_an_unreachable_dagster_webserver_in_one_line(env, capsys, monkeypatch, rows):
    owner = rows.owner()
    rows.video(owner, n_scenes=1)  # missing everywhere: the plan has something to launch
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/graphql"
    monkeypatch.setenv("HEIMDEX_DAGSTER_GRAPHQL_URL", url)
    code, out, err = run_cli(capsys, "reprocess", "--scope", "owner", "--owner-id", str(owner))
    assert (code, out) == (1, "")
    assert err == f"heimdex: error: cannot reach the Dagster webserver at {url}: ConnectError\n"


def test_a_database_that_is_down_is_named_without_its_password(env, capsys, monkeypatch):
    monkeypatch.setenv("HEIMDEX_DATABASE_URL", "postgresql://app:hunter2@127.0.0.1:9/heimdex")
    code, _, err = run_cli(capsys, "status")
    assert code == 1
    assert err.startswith(
        "heimdex: error: cannot reach the application database at postgresql+psycopg://app:***@127.0.0.1:9/heimdex"
    )
    assert "hunter2" not in err and err.count("\n") == 1


def test_status_and_a_dry_run_load_no_model(env, rows, tmp_path):
    """Model identity is configuration: with a CLIP checkpoint that cannot load, status and a dry run
    still answer, and neither torch nor open_clip is even imported."""
    rows.video(rows.owner(), n_scenes=1)
    bogus = tmp_path / "not-a-checkpoint.pt"
    bogus.write_bytes(b"these bytes are no model")
    script = (
        "import sys, json\n"
        "from heimdex_assets.cli import main\n"
        "assert main(['status', '--json']) == 0\n"
        "assert main(['reprocess', '--scope', 'all', '--dry-run', '--json']) == 0\n"
        "print(json.dumps(sorted(m for m in ('torch', 'open_clip', 'sentence_transformers') if m in sys.modules)))\n"
    )
    environment = {**os.environ, "HEIMDEX_CLIP_CHECKPOINT": str(bogus), "HEIMDEX_CLIP_MODEL": "ViT-B-32"}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    status = json.loads("\n".join(lines[: lines.index("}") + 1]))
    model = status["assets"]["scene_clip_embeddings"]["model_id"]
    assert model.startswith("open_clip:ViT-B-32@sha256:")  # from the file's bytes, not from loading it
    assert status["assets"]["scene_clip_embeddings"]["partitions"]["missing"] == 1


def test_tables_list_is_complete(db):
    with db.engine.connect() as conn:
        tables = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert tables - {"alembic_version"} == {t.strip() for t in ALL_TABLES.split(",")}


@pytest.fixture
def tiny_env(env, monkeypatch, tiny_clip_checkpoint, tmp_path):
    """The CLI configured like a small worker: tiny CLIP checkpoint, local text model, SQLite search."""
    from heimdex_assets.resources.clip_embedder import TINY_MODEL

    monkeypatch.setenv("HEIMDEX_CLIP_MODEL", TINY_MODEL)
    monkeypatch.setenv("HEIMDEX_CLIP_CHECKPOINT", str(tiny_clip_checkpoint))
    monkeypatch.setenv("HEIMDEX_CLIP_DEVICE", "cpu")
    monkeypatch.setenv("HEIMDEX_TEXT_PROVIDER", "local")
    monkeypatch.setenv("HEIMDEX_SEARCH_SQLITE_PATH", str(tmp_path / "search" / "scenes.sqlite"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("HEIMDEX_BLOB_ROOTS", str(tmp_path))  # the `rows` fixture's media
    return env


def test_reprocess_sync_shows_progress_on_stderr_and_the_summary_on_stdout(tiny_env, capsys, rows):
    owner = rows.owner()
    videos = [rows.video(owner, n_scenes=3), rows.video(owner, n_scenes=2)]
    code, out, err = run_cli(capsys, "reprocess", "--scope", "owner", "--owner-id", str(owner), "--sync")
    assert code == 0, err
    # Not a terminal: plain lines, no carriage returns; asset partitions (4 video assets x 2 videos, and the
    # owner's 2 person assets), scenes/s from the 5 scenes, and the time taken at the end.
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("[........................]   0%  0/10 partitions")
    assert re.search(r"100%  10/10 partitions, [\d.]+ scenes/s, done in \d+s$", lines[-1]), err
    assert "redid 10 asset partition(s) across 2 video(s) in scope" in out and "[" not in out

    # With --json, stdout is the JSON alone; the progress stays on stderr.
    code, out, err = run_cli(
        capsys, "reprocess", "--scope", "video", "--video-id", str(videos[0]), "--force", "--sync", "--json"
    )
    assert code == 0 and json.loads(out)["failed_runs"] == []
    assert err.splitlines()[-1].startswith("[########################] 100%  4/4 partitions")


def test_reprocess_sync_names_the_partitions_whose_runs_failed(tiny_env, capsys, rows, monkeypatch, tmp_path):
    owner = rows.owner()
    videos = sorted(str(rows.video(owner, n_scenes=1)) for _ in range(2))
    bogus = tmp_path / "not-a-checkpoint.pt"  # a model identity to plan with, weights that fail in the run
    bogus.write_bytes(b"these bytes are no model")
    monkeypatch.setenv("HEIMDEX_CLIP_CHECKPOINT", str(bogus))
    code, out, err = run_cli(capsys, "reprocess", "--scope", "owner", "--owner-id", str(owner), "--sync", "--json")
    assert (code, out) == (1, ""), err
    message = err.splitlines()[-1]
    assert message.startswith("heimdex: error: 1 run(s) failed, 2 partition(s): "), err
    assert all(f"{v} (scene_" in message for v in videos)
    assert "; first error: " in message
    assert ", 8 failed, " in err.splitlines()[-2]


def test_reprocess_timeout_goes_with_wait(env, capsys):
    code, out, err = run_cli(capsys, "reprocess", "--scope", "all", "--timeout", "5")
    assert (code, out, err) == (1, "", "heimdex: error: --timeout goes with --wait\n")


def test_reprocess_sync_names_the_items_that_failed_and_exits_2(tiny_env, capsys, rows, tmp_path):
    owner = rows.owner()
    video = rows.video(owner, n_scenes=1)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG but not really")
    bad_scene = rows.scene(video, owner, 1, thumbnail_uri=str(corrupt), thumbnail_sha256=None)

    code, out, err = run_cli(capsys, "reprocess", "--scope", "video", "--video-id", str(video), "--sync")

    # The runs completed; the one item that could not be embedded is named, with its reason, and the exit
    # status says so.
    assert code == 2, err
    summary = out.splitlines()[-1]
    assert "redid 4 asset partition(s) across 1 video(s) in scope" in summary
    assert f"scene_clip_embeddings item {bad_scene} (video {video}): " in summary
    assert "not a readable image" in summary and "(recorded; retried after their backoff)" in summary
    code, out, _ = run_cli(
        capsys, "reprocess", "--scope", "video", "--video-id", str(video), "--retry-failed", "--sync", "--json"
    )
    failed = json.loads(out)["failed_items"]
    assert code == 2 and {(f["asset_key"], f["item_id"]) for f in failed} >= {("scene_clip_embeddings", str(bad_scene))}


def test_a_waiting_plan_shows_in_status_and_approve_launches_exactly_it(tiny_env, capsys, rows, db):
    from heimdex_assets.models import expected_models
    from heimdex_assets.reprocess import ReprocessRequest, plan_reprocess
    from heimdex_assets.settings import resources_from_env
    from heimdex_assets.spend_guard import record_plan

    owner = rows.owner()
    videos = sorted(str(rows.video(owner, n_scenes=1)) for _ in range(2))
    resources = resources_from_env(deferred=False)
    with db.transaction() as conn:  # as the stale sensor records a plan over the ceiling
        plan = plan_reprocess(conn, ReprocessRequest("video", uuid.UUID(videos[0])), expected_models(conn, resources))
        stored, _ = record_plan(conn, plan, created_by="stale_partitions_sensor", status="waiting", reason="over it")

    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert f"spend guard: plan {stored.id} waits for approval since " in out
    assert f"launch it with: heimdex approve {stored.id}" in out

    code, out, err = run_cli(capsys, "approve", str(stored.id), "--sync", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["plan"]["status"] == "launched" and result["plan"]["approved_by"].startswith("cli:")
    with db.engine.connect() as conn:
        written = set(conn.execute(text("SELECT DISTINCT partition_id::text FROM partition_ledger")).scalars())
    assert written == {videos[0]}  # exactly the plan's partitions: not the other video, stale as it is

    code, out, err = run_cli(capsys, "approve", str(stored.id))
    assert (code, out) == (1, "")
    assert err == f"heimdex: error: plan {stored.id} is launched: only a waiting plan can be approved\n"
    code, _, err = run_cli(capsys, "approve", "not-a-plan")
    assert (
        code == 1 and err.startswith("heimdex: error: malformed plan id") and err[-1] == "\n" and err.count("\n") == 1
    )
