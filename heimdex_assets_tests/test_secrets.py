"""Secrets stay out of what runs leave behind: ``heimdex demo`` and ``heimdex reprocess --sync`` run assets in
this process, and neither the database password nor the OpenAI key may reach DAGSTER_HOME (run storage,
snapshots, event logs, compute logs) or any line printed or logged."""

import json
import logging
import sqlite3
import uuid
import zlib
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

from sqlalchemy.engine import make_url

from heimdex_assets.cli import main
from heimdex_assets.resources.clip_embedder import TINY_MODEL

SQLITE_HEADER = b"SQLite format 3\x00"


def stored_bytes(path: Path) -> Iterator[bytes]:
    """The file's bytes and, in an SQLite file, every cell (inflated when zlib-compressed, as Dagster
    stores job snapshots), so that a secret is found however it was written."""
    data = path.read_bytes()
    yield data
    if not data.startswith(SQLITE_HEADER):
        return
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for cell in row:
                    if isinstance(cell, bytes):
                        yield cell
                        with suppress(zlib.error):
                            yield zlib.decompress(cell)
                    elif isinstance(cell, str):
                        yield cell.encode()


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    return [
        f"{path.relative_to(root)} holds {secret[:6]}…"
        for path in sorted(root.rglob("*"))
        if path.is_file()
        for secret in secrets
        if any(secret.encode() in chunk for chunk in stored_bytes(path))
    ]


def test_demo_and_a_sync_reprocess_write_no_secret_under_dagster_home_or_in_any_log(
    db, database_url, fake_openai, tiny_clip_checkpoint, tmp_path, monkeypatch, capfd, caplog
):
    url = make_url(database_url)
    # The test server trusts local connections, so an added password travels in the URL unchecked.
    password = url.password or f"pw-{uuid.uuid4().hex}"
    api_key = f"sk-{uuid.uuid4().hex}"
    home = tmp_path / "home"
    for name in ("HEIMDEX_OPENSEARCH_URL", "HEIMDEX_SEARCH_SQLITE_PATH", "HEIMDEX_BLOB_ROOTS", "HEIMDEX_BLOB_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "HEIMDEX_DATABASE_URL": url.set(password=password).render_as_string(hide_password=False),
        "HEIMDEX_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "HEIMDEX_TEXT_PROVIDER": "openai",
        "OPENAI_API_KEY": api_key,
        "OPENAI_BASE_URL": fake_openai.url,
        "HEIMDEX_CLIP_MODEL": TINY_MODEL,
        "HEIMDEX_CLIP_CHECKPOINT": str(tiny_clip_checkpoint),
        "HEIMDEX_CLIP_DEVICE": "cpu",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)

    assert main(["demo", "--videos-per-owner", "1", "--scenes", "2", "--json"]) == 0
    demo_out, demo_err = capfd.readouterr()
    summary = json.loads(demo_out)
    # The runs used both secrets: text vectors came from the (fake) API with the key, and the demo's
    # media was read under the default blob roots.
    assert summary["models"]["text"] == ["text-embedding-3-small"] and summary["failed_items"] == 0
    assert {h["authorization"] for h in fake_openai.headers} == {f"Bearer {api_key}"}

    assert main(["reprocess", "--scope", "all", "--force", "--sync", "--json"]) == 0
    sync_out, sync_err = capfd.readouterr()
    assert json.loads(sync_out)["failed_runs"] == []

    assert (home / "dagster" / "history" / "runs.db").exists()  # the runs were recorded there
    assert files_holding(home, [password, api_key]) == []
    for printed in (demo_out, demo_err, sync_out, sync_err, caplog.text):
        assert password not in printed and api_key not in printed
