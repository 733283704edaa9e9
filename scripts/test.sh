#!/usr/bin/env bash
# One command from a fresh clone to a passing suite: set up .venv, start a real OpenSearch node
# (stopped again at the end if this script started it), then pytest. PostgreSQL with pgvector is
# started by the test session itself (heimdex_assets.db.embedded, 127.0.0.1, non-root user).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

export HF_HUB_OFFLINE=1   # no model hub here: fail fast instead of a 45 s lookup
export HEIMDEX_OPENSEARCH_PORT="${HEIMDEX_OPENSEARCH_PORT:-9250}"
started_opensearch=0
if [[ -z "${HEIMDEX_TEST_OPENSEARCH_URL:-}" ]]; then
  if ! bash scripts/opensearch.sh status >/dev/null 2>&1; then
    started_opensearch=1
  fi
  HEIMDEX_TEST_OPENSEARCH_URL="$(bash scripts/opensearch.sh start)"
  export HEIMDEX_TEST_OPENSEARCH_URL
fi
cleanup() { if [[ $started_opensearch == 1 ]]; then bash scripts/opensearch.sh stop || true; fi; }
trap cleanup EXIT

.venv/bin/python -m pytest "$@"
