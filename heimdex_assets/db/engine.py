"""Engines for the application database: URL handling, clear connection errors, migrations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


_REVISION = re.compile(r'^(down_)?revision\s*=\s*"([^"]*)"', re.MULTILINE)


def head_revision() -> str:
    """The newest migration, read from the revision files themselves: alembic (a third of a second to
    import) is needed only when there is something to migrate."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        for down, value in _REVISION.findall(path.read_text()):
            (parents if down else revisions).add(value)
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have one head, found {sorted(heads)}")
    return heads.pop()


def is_current(engine: Engine) -> bool:
    """Whether the database is at the newest migration."""
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar() if exists else None
    return current == head_revision()


def migrate(engine: Engine) -> None:
    """Apply every pending migration (idempotent; serialised by an advisory lock across processes)."""
    if is_current(engine):
        return
    from alembic import command

    cfg = _alembic_config()
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
