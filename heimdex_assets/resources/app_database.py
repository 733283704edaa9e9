"""The application database: PostgreSQL with pgvector, embedded when no URL is configured."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import PrivateAttr
from sqlalchemy import Connection, Engine

from heimdex_assets.db.embedded import default_server
from heimdex_assets.db.engine import connect, migrate


def resolve_database_url(url: str | None) -> str:
    """``url`` when given, else the embedded server's (started on demand)."""
    return url or default_server().ensure_running()


class AppDatabase(dg.ConfigurableResource):
    """PostgreSQL + pgvector holding owners, videos, scenes, persons and every derived vector.

    ``url`` comes from ``HEIMDEX_DATABASE_URL``; when it is empty the embedded server of
    ``heimdex_assets.db.embedded`` is started and used. Migrations are applied on first use.
    """

    url: str | None = None

    _engine: Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._engine = open_database(self.url)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # used outside a Dagster run (CLI, API, tests)
            self._engine = open_database(self.url)
        return self._engine

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back on any exception."""
        with self.engine.begin() as conn:
            yield conn

    def describe(self) -> str:
        """The database URL without its password."""
        return self.engine.url.render_as_string(hide_password=True)


_ENGINES: dict[str, Engine] = {}


def open_database(url: str | None) -> Engine:
    """A migrated engine for ``url`` (or the embedded server), shared within the process."""
    resolved = resolve_database_url(url)
    engine = _ENGINES.get(resolved)
    if engine is None:
        engine = connect(resolved)
        migrate(engine)
        _ENGINES[resolved] = engine
    return engine
