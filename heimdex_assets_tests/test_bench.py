"""bench/scene_embeddings.py --zero-cost: the pipeline's own ceiling runs end to end (no timing asserted).

A subprocess on a free port with its own work directory: its embedded PostgreSQL, corpus and Dagster
storage are its own, so it runs beside the other tests' servers."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from heimdex_assets_tests.conftest import STATE_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero_cost_bench_moves_every_scene_through_the_pipeline(tmp_path):
    # Under the tests' state directory, not pytest's: the embedded server runs as its service user.
    work = STATE_DIR / "bench-zero-cost"
    shutil.rmtree(work, ignore_errors=True)
    out = tmp_path / "zero-cost.json"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "scene_embeddings.py"), "--zero-cost", "--videos", "2"]
    cmd += ["--dagster-storage", "postgres"]  # as in production (the default, SQLite, runs in every other test)
    cmd += ["--scenes", "3", "--quiet", "--pg-port", str(free_port()), "--work-dir", str(work)]
    cmd += ["--json-out", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["zero_cost"] is True and report["dagster_storage"] == "postgres"
    assert report["models"]["clip"] == "open_clip:heimdex-zero-cost/random"
    assert report["corpus"]["scenes"] == 6
    # The bench itself stops on a round that skipped or failed work; the figures say the same.
    pipeline = report["pipeline"]
    assert (pipeline["clip_items_computed"], pipeline["clip_vectors_embedded"], pipeline["clip_failures"]) == (6, 6, 0)
    assert pipeline["text_items"] == 0  # the text model is not zero-cost: its asset is left out
    assert report["rates_scenes_per_s"]["pipeline"] > 0
    assert "zero-cost ceiling" in proc.stdout
