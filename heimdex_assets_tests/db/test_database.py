import logging

import pytest
from sqlalchemy import text

from heimdex_assets.db.engine import DatabaseUnavailableError, connect, migrate, normalise_url, redact
from heimdex_assets.partitions import InvalidIdError, canonical_uuid, parse_partition_key
from heimdex_assets.resources import AppDatabase


def test_a_database_that_is_down_gives_one_clear_line_without_the_password(caplog):
    url = "postgresql://heimdex:s3cret-pass@127.0.0.1:9/heimdex"
    with caplog.at_level(logging.DEBUG), pytest.raises(DatabaseUnavailableError) as err:
        AppDatabase(url=url).engine  # noqa: B018
    message = str(err.value)
    assert message.startswith(
        "cannot reach the application database at postgresql+psycopg://heimdex:***@127.0.0.1:9/heimdex: "
    )
    assert "\n" not in message
    assert "s3cret-pass" not in message and "s3cret-pass" not in caplog.text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgres://u@h:5/db", "postgresql+psycopg://u@h:5/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_urls_use_psycopg3(url, expected):
    assert normalise_url(url) == expected


def test_non_postgres_urls_are_refused():
    with pytest.raises(ValueError, match="must be PostgreSQL, got 'sqlite'"):
        normalise_url("sqlite:///x.db")


def test_redact_hides_passwords():
    assert redact("postgresql://a:b@h/d") == "postgresql://a:***@h/d"


def test_migrations_are_idempotent_and_generated_hashes_follow_edits(database_url, db, rows):
    engine = connect(database_url)
    migrate(engine)
    migrate(engine)
    owner = rows.owner()
    video = rows.video(owner, 0)
    scene = rows.scene(video, owner, 0, transcript="héllo")
    with db.transaction() as conn:
        sha = conn.execute(text("SELECT transcript_sha256 FROM scenes WHERE id = :i"), {"i": scene}).scalar()
        conn.execute(text("UPDATE scenes SET transcript = 'bye' WHERE id = :i"), {"i": scene})
        new = conn.execute(text("SELECT transcript_sha256 FROM scenes WHERE id = :i"), {"i": scene}).scalar()
    import hashlib

    assert sha == hashlib.sha256("héllo".encode()).hexdigest()
    assert new == hashlib.sha256(b"bye").hexdigest()


@pytest.mark.parametrize("value", ["", "nope", "1234", "3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c7"])
def test_malformed_ids_are_rejected_with_the_value(value):
    with pytest.raises(InvalidIdError, match=f"malformed video id {value!r}"):
        canonical_uuid(value, "video id")


def test_partition_keys_must_be_canonical():
    assert str(parse_partition_key("3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70")) == "3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70"
    with pytest.raises(InvalidIdError, match="not canonical"):
        parse_partition_key("{3f2b8c1e-7d4a-4c3e-9a51-0b6e2f1d9c70}")


def test_the_embedded_server_refuses_a_port_held_by_another_cluster(database_url, tmp_path):
    from sqlalchemy import make_url

    from heimdex_assets.db.embedded import EmbeddedPostgres

    port = make_url(database_url).port
    other = EmbeddedPostgres(data_dir=tmp_path / "elsewhere", port=port)
    with pytest.raises(DatabaseUnavailableError, match=f"port {port} on 127.0.0.1 is served by another PostgreSQL"):
        other.ensure_running()
