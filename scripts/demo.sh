#!/usr/bin/env bash
# One command from a fresh clone to a materialised demo: set up .venv, then `heimdex demo`.
# With HEIMDEX_DATABASE_URL unset, an embedded PostgreSQL + pgvector is started under HEIMDEX_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/heimdex demo "$@"
