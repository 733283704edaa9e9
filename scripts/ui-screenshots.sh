#!/usr/bin/env bash
# Headless screenshots of the Dagster UI operating reprocessing (issue 8), on a throwaway demo:
#   scripts/ui-screenshots.sh [OUT_DIR]        (default /tmp/heimdex-ui)
# 1. `heimdex demo` (small corpus, placeholder CLIP, local text model) on a temporary HEIMDEX_HOME, with the
#    embedded PostgreSQL on HEIMDEX_EMBEDDED_PG_PORT (default 54391) and Dagster's runs in $HEIMDEX_HOME/dagster;
# 2. scripts/ui_screenshots_prepare.py: two videos' transcripts edited (stale), the PROCESSING video made READY
#    and registered (missing), one freshness_checks_sensor tick recorded, the `reprocess` job run (its backfills);
# 3. dagster-webserver -w workspace.yaml on a free 127.0.0.1 port (the repo's dagster.yaml, "Join the community"
#    dialog off), and headless Chromium screenshots of its pages, driven over the DevTools protocol by the helper
#    (a few tabs and selections are not in the UI's URLs: it clicks them).
# Everything started is stopped at the end and the temporary home removed (KEEP=1 keeps it, to browse again).
# CHROMIUM: the browser (default chromium); BUDGET: at most this many ms for a page to settle (default 15000).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=$REPO/.venv/bin/python
OUT=${1:-/tmp/heimdex-ui}
CHROMIUM=${CHROMIUM:-chromium}
BUDGET=${BUDGET:-15000}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/heimdex-ui-work.XXXXXX")
chmod 755 "$WORK" # under root the embedded PostgreSQL runs as the user heimdex: it must reach its data directory
export HEIMDEX_HOME=$WORK/home
export DAGSTER_HOME=$HEIMDEX_HOME/dagster
export HEIMDEX_EMBEDDED_PG_PORT=${HEIMDEX_EMBEDDED_PG_PORT:-54391}
export HEIMDEX_CLIP_MODEL=tiny-random HEIMDEX_TEXT_PROVIDER=local HF_HUB_OFFLINE=1
export HEIMDEX_STALE_SENSOR_DEFAULT=stopped # no daemon here anyway; said for clarity
unset HEIMDEX_DATABASE_URL OPENAI_API_KEY HEIMDEX_OPENSEARCH_URL HEIMDEX_BLOB_ROOTS HEIMDEX_SEARCH_SQLITE_PATH
mkdir -p "$DAGSTER_HOME"
{ cat dagster.yaml; printf 'nux:\n  enabled: false\n'; } >"$DAGSTER_HOME/dagster.yaml"

WEBSERVER_PID=
cleanup() {
    if [[ -n $WEBSERVER_PID ]]; then
        kill -TERM -- "-$WEBSERVER_PID" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$WEBSERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$WEBSERVER_PID" 2>/dev/null || true
    fi
    "$PY" -m heimdex_assets.db.embedded stop >/dev/null 2>&1 || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== heimdex demo (HEIMDEX_HOME=$HEIMDEX_HOME, embedded PostgreSQL on port $HEIMDEX_EMBEDDED_PG_PORT)" >&2
"$REPO/.venv/bin/heimdex" demo --videos-per-owner 3 --scenes 4 >"$WORK/demo.log" 2>&1 || {
    tail -20 "$WORK/demo.log" >&2
    exit 1
}
tail -22 "$WORK/demo.log" >&2

echo "== stale and missing partitions, one freshness-checks tick, the reprocess job's backfills" >&2
"$PY" scripts/ui_screenshots_prepare.py prepare >"$OUT/prepare.json" 2>"$WORK/prepare.log" || {
    tail -20 "$WORK/prepare.log" >&2
    exit 1
}
cat "$OUT/prepare.json" >&2
first() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][0])' "$OUT/prepare.json" "$1"; }
STALE=$(first stale_videos)
MISSING=$(first missing_videos)

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
UI=http://127.0.0.1:$PORT
echo "== dagster-webserver at $UI (DAGSTER_HOME=$DAGSTER_HOME)" >&2
setsid "$REPO/.venv/bin/dagster-webserver" -h 127.0.0.1 -p "$PORT" -w workspace.yaml >"$WORK/webserver.log" 2>&1 &
WEBSERVER_PID=$!
"$PY" scripts/ui_screenshots_prepare.py wait "$UI/graphql" 180 || {
    tail -30 "$WORK/webserver.log" >&2
    exit 1
}

# NAME<TAB>PATH[<TAB>what to click...]; a label ending in * is a prefix (partition keys are shown shortened).
# The freshness of scene_text_embeddings is the `fresh` check of its companion asset freshness/scene_text_embeddings
# (heimdex_assets/checks.py): its Checks tab, sub-tab Partitions, holds the per-partition results.
CHECK="/assets/freshness/scene_text_embeddings?view=checks&checkDetail=fresh"
EXPANDED="global@global:scene_embeddings,global@global:search,global@global:freshness"
TAB=$'\t'
SHOTS=(
    "01-asset-catalog$TAB/assets"
    "02-asset-graph$TAB/asset-groups?expanded=$EXPANDED"
    "03-check-partitions-stale$TAB$CHECK${TAB}Partitions$TAB${STALE:0:8}*"
    "04-check-partitions-missing$TAB$CHECK${TAB}Partitions$TAB${MISSING:0:8}*"
    "05-asset-partitions$TAB/assets/scene_text_embeddings?view=partitions$TAB${MISSING:0:8}*"
    "06-backfills$TAB/overview/backfills"
    "07-reprocess-launchpad$TAB/locations/heimdex_assets/jobs/reprocess/playground"
)
rm -f "$OUT"/0*.png
"$PY" scripts/ui_screenshots_prepare.py shoot "$OUT" "$UI" "$BUDGET" "${SHOTS[@]}"
echo "screenshots in $OUT" >&2
