"""Engines for the application database: URL handling, clear connection errors, migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError, OperationalError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseUnavailableError(RuntimeError):
    """The application database cannot be reached; the message names the URL without its password."""


def normalise_url(url: str) -> str:
    """Use psycopg 3 for every ``postgres``/``postgresql`` URL, whatever driver the caller named."""
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(f"the application database must be PostgreSQL, got {parsed.get_backend_name()!r}")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL may hold a secret anywhere: show none of it
        return "<unparseable database URL>"


def _reason(exc: BaseException, url: str) -> str:
    """The driver's message, first line only, with any password scrubbed out."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = make_url(url).password
    return message.replace(str(password), "***") if password else message


def connect(url: str, *, pool_size: int = 5) -> Engine:
    """An engine on ``url`` that has answered one query; DatabaseUnavailableError otherwise."""
    url = normalise_url(url)
    engine = create_engine(url, pool_pre_ping=True, pool_size=pool_size, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError) as exc:
        engine.dispose()
        raise DatabaseUnavailableError(
            f"cannot reach the application database at {redact(url)}: {_reason(exc, url)}"
        ) from None
    return engine


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def is_current(engine: Engine) -> bool:
    """Whether the database is at the newest migration."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


def migrate(engine: Engine) -> None:
    """Apply every pending migration (idempotent; serialised by an advisory lock across processes)."""
    if is_current(engine):
        return
    cfg = _alembic_config()
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
