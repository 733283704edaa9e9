#!/usr/bin/env bash
# The production stack of docker/, run for real: PostgreSQL+pgvector, the user-code gRPC server, the
# Dagster webserver and daemon (QueuedRunCoordinator + DockerRunLauncher: one container per run) and
# the admin API, brought up with docker/docker-compose.yml + docker/docker-compose.local.yml (host
# network, 127.0.0.1 only, stand-ins for the public images). Then: seed a tiny demo corpus, launch a
# forced reprocess of everything through the webserver, check that every run of its backfills ran
# in a container of its own and succeeded, check vectors and search, tear everything down.
#
#   scripts/docker-smoke.sh [--keep-images] [--keep-stack] [--kill-one]
#
# --kill-one: `docker kill` the first run container a few seconds after it starts; run monitoring sees
# the dead worker, run_retries relaunches the run in a new container, and the verdict requires that retry
# to succeed and every asset to end fresh.
#
# Needs a running Docker engine and `docker compose` or `docker-compose`. Where no registry is
# reachable (no debian:bookworm-slim to pull) the base image is made with debootstrap (root).
# Ports (127.0.0.1): HEIMDEX_SMOKE_PG_PORT 56432, _GRPC_PORT 56400, _WEB_PORT 56300, _API_PORT 56800.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP_IMAGES=0 KEEP_STACK=0 KILL_ONE=0
for arg in "$@"; do
  case "$arg" in
    --keep-images) KEEP_IMAGES=1 ;;
    --keep-stack) KEEP_STACK=1 KEEP_IMAGES=1 ;;
    --kill-one) KILL_ONE=1 ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "docker-smoke: unknown argument $arg" >&2; exit 2 ;;
  esac
done

export HEIMDEX_SMOKE_PG_PORT="${HEIMDEX_SMOKE_PG_PORT:-56432}"
export HEIMDEX_SMOKE_GRPC_PORT="${HEIMDEX_SMOKE_GRPC_PORT:-56400}"
export HEIMDEX_SMOKE_WEB_PORT="${HEIMDEX_SMOKE_WEB_PORT:-56300}"
export HEIMDEX_SMOKE_API_PORT="${HEIMDEX_SMOKE_API_PORT:-56800}"
export HEIMDEX_JWT_SECRET="${HEIMDEX_JWT_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
export COMPOSE_PROJECT_NAME=heimdex-smoke
BASE_IMAGE="${HEIMDEX_BASE_IMAGE:-heimdex-base:bookworm}"
IMAGE=heimdex-assets:latest
LOG_DIR="${HEIMDEX_SMOKE_LOGS:-$(mktemp -d /tmp/heimdex-smoke.XXXXXX)}"
mkdir -p "$LOG_DIR"
STARTED=$SECONDS

say() { printf 'docker-smoke: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
elapsed() { echo $((SECONDS - $1)); }

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start dockerd, e.g. \
dockerd --bridge=none --iptables=false --ip-masq=false &"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else
  command -v docker-compose >/dev/null || die "neither 'docker compose' nor 'docker-compose' is installed"
  COMPOSE=(docker-compose)
fi
compose() { "${COMPOSE[@]}" "$@"; }

# --- images -------------------------------------------------------------------------------------
t0=$SECONDS
BUILT_BASE=
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  BUILT_BASE="$BASE_IMAGE"
  if [[ "$BASE_IMAGE" == heimdex-base:bookworm ]]; then
    command -v debootstrap >/dev/null || die "the base image needs debootstrap (apt-get install debootstrap) or HEIMDEX_BASE_IMAGE=debian:bookworm-slim"
    [[ $(id -u) == 0 ]] || die "debootstrap needs root (or set HEIMDEX_BASE_IMAGE=debian:bookworm-slim)"
    rootfs="$(mktemp -d /tmp/heimdex-rootfs.XXXXXX)"
    say "base image: debootstrap --variant=minbase bookworm (about 2 minutes)"
    debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      >"$LOG_DIR/debootstrap.log" 2>&1 || die "debootstrap failed (log: $LOG_DIR/debootstrap.log)"
    # The host's locally added CAs (a TLS-inspecting proxy's, say): the image's ca-certificates trusts them.
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
      "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
  else
    docker pull "$BASE_IMAGE" >/dev/null || die "cannot pull $BASE_IMAGE"
  fi
fi
base_s=$(elapsed $t0)
t0=$SECONDS
say "project image: docker build (first time: several minutes, torch is large; log: $LOG_DIR/build.log)"
# The context is what the Dockerfile copies, nothing else (the repository may hold a large .venv).
tar -c --exclude=__pycache__ --exclude='*.egg-info' pyproject.toml setup.py README.md heimdex_assets docker \
  | docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -f docker/Dockerfile -t "$IMAGE" - \
    >"$LOG_DIR/build.log" 2>&1 || { tail -20 "$LOG_DIR/build.log" >&2; die "docker build failed"; }
build_s=$(elapsed $t0)
say "images ready: base ${base_s}s, project ${build_s}s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}'))"

# --- stack --------------------------------------------------------------------------------------
# The production compose file with the local override, merged; published ports are dropped from the
# services on the host's network (meaningless there, and refused by docker-compose 1.x, which cannot
# reset a list from an override file).
compose_file="$LOG_DIR/compose.yml"
"${COMPOSE[@]}" -f docker/docker-compose.yml -f docker/docker-compose.local.yml config \
  | docker run --rm -i --network none "$IMAGE" python -c 'import sys, yaml
c = yaml.safe_load(sys.stdin)
for s in c["services"].values():
    if s.get("network_mode") == "host":
        s.pop("ports", None)
yaml.safe_dump(c, sys.stdout, sort_keys=False)' >"$compose_file" || die "the compose files do not merge"
COMPOSE+=(-f "$compose_file")
teardown() {
  local rc=$?
  [[ -n "${EVENTS_PID:-}" ]] && kill "$EVENTS_PID" 2>/dev/null
  if [[ $KEEP_STACK == 1 ]]; then
    say "stack kept (--keep-stack): ${COMPOSE[*]} down -v to remove it"
  else
    compose logs --no-color >"$LOG_DIR/stack.log" 2>&1 || true
    # Run containers first: they hold the shared volume.
    docker ps -aq --filter label=heimdex.smoke=1 | xargs -r docker rm -f >/dev/null 2>&1 || true
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    [[ $KEEP_IMAGES == 1 ]] || docker image rm "$IMAGE" $BUILT_BASE >/dev/null 2>&1 || true
    say "torn down: containers, volumes$([[ $KEEP_IMAGES == 1 ]] || echo ", images built ($IMAGE $BUILT_BASE)"); logs in $LOG_DIR"
  fi
  exit $rc
}
trap teardown EXIT

t0=$SECONDS
# Every container the run launcher starts, as the engine reports it.
docker events --filter type=container --filter label=heimdex.smoke=1 \
  --format '{{.Action}} {{.Actor.ID}} {{index .Actor.Attributes "dagster/run_id"}} {{index .Actor.Attributes "exitCode"}}' \
  >"$LOG_DIR/run-containers.events" 2>/dev/null &
EVENTS_PID=$!
compose up -d --no-build postgres user-code webserver daemon admin-api >"$LOG_DIR/up.log" 2>&1 \
  || { cat "$LOG_DIR/up.log" >&2; die "compose up failed"; }
wait_for() {  # name, seconds, command...
  local name=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { compose logs --tail=30 >&2; die "$name not ready after ${deadline}s"; }
    sleep 2
  done
}
web="http://127.0.0.1:$HEIMDEX_SMOKE_WEB_PORT"
api="http://127.0.0.1:$HEIMDEX_SMOKE_API_PORT"
wait_for webserver 240 curl -fsS "$web/server_info"
wait_for "code location" 240 bash -c "curl -fsS '$web/graphql' -H 'Content-Type: application/json' \
  -d '{\"query\":\"{workspaceOrError{... on Workspace{locationEntries{locationOrLoadError{__typename}}}}}\"}' \
  | grep -q '\"RepositoryLocation\"'"
wait_for "admin API" 120 curl -fsS "$api/docs"
stack_s=$(elapsed $t0)
say "stack up in ${stack_s}s: $(docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
  --format '{{.Label "com.docker.compose.service"}}' | sort | tr '\n' ' ')"

# --- smoke --------------------------------------------------------------------------------------
t0=$SECONDS
# Commands run inside the admin API's container: the stack's image, environment, network and volumes
# (`compose run` would do as well, but docker-compose 1.x adds links, refused on the host network).
api_container=$(compose ps -q admin-api)
cli() { docker exec -i "$api_container" "$@"; }
say "seeding: heimdex demo --videos-per-owner 1 --scenes 2 (in-process runs, recorded in the stack's Dagster storage)"
cli heimdex demo --videos-per-owner 1 --scenes 2 --json >"$LOG_DIR/demo.json" 2>"$LOG_DIR/demo.log" \
  || { tail -20 "$LOG_DIR/demo.log" >&2; die "heimdex demo failed"; }
say "launching: POST /v1/admin/reprocess-embeddings {scope: all, force: true} (backfills on the daemon)"
token=$(cli python -c 'import jwt, os, time
now = int(time.time())
claims = {"sub": "docker-smoke", "role": "admin", "scope": "global", "iat": now, "exp": now + 3600,
          "aud": os.environ.get("HEIMDEX_JWT_AUDIENCE") or "heimdex", "iss": os.environ.get("HEIMDEX_JWT_ISSUER") or "heimdex"}
print(jwt.encode(claims, os.environ["HEIMDEX_JWT_SECRET"], algorithm="HS256"))')
curl -fsS -X POST "$api/v1/admin/reprocess-embeddings" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' -d '{"scope": "all", "force": true}' >"$LOG_DIR/reprocess.json" \
  || die "the admin API refused the reprocess: $(cat "$LOG_DIR/reprocess.json" 2>/dev/null)"
backfills=$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["backfill_ids"]))' "$LOG_DIR/reprocess.json")
[[ -n "$backfills" ]] || die "no backfill launched: $(cat "$LOG_DIR/reprocess.json")"
say "backfills: $backfills; waiting for every run"
if [[ $KILL_ONE == 1 ]]; then  # kill the first container of a run of these backfills once it is under way
  (
    deadline=$((SECONDS + 600)) seen=" "
    while ((SECONDS < deadline)); do
      while read -r action c run _; do
        [[ $action == start && $seen != *" $c "* ]] || continue
        seen+="$c "
        # Sensors launch runs too (freshness checks, stale partitions): only a run of the reprocess counts.
        backfill=$(cli python -c 'import sys, dagster as dg
r = dg.DagsterInstance.get().get_run_by_id(sys.argv[1])
print(r.tags.get("dagster/backfill", "") if r else "")' "$run" </dev/null 2>/dev/null)
        if [[ -n "$backfill" && " $backfills " == *" $backfill "* ]]; then
          sleep 4
          docker kill "$c" >/dev/null 2>&1 && echo "$c" >"$LOG_DIR/killed" \
            && say "killed run container ${c:0:12} (run ${run:0:8} of backfill $backfill)"
          exit 0
        fi
      done <"$LOG_DIR/run-containers.events"
      sleep 1
    done
    say "--kill-one: no run container of the backfills started within 600 s"
  ) &
fi
# The verdict comes from Dagster's run storage: each backfill's runs, their status and the container
# the Docker run launcher recorded on each (tag docker/container_id).
cli python - "$backfills" >"$LOG_DIR/runs.json" 2>"$LOG_DIR/runs.log" <<'PY' || { tail -20 "$LOG_DIR/runs.log" >&2; die "the backfills did not finish"; }
import json, sys, time
import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus

instance = dg.DagsterInstance.get()
backfill_ids = sys.argv[1].split()
deadline = time.monotonic() + 900
while True:
    backfills = [instance.get_backfill(b) for b in backfill_ids]
    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_ids}))
    retried = {r.tags.get("dagster/parent_run_id") for r in runs}
    # A run whose worker died is retried by the daemon (run_retries): wait for its retry too.
    waiting_retry = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE and r.run_id not in retried]
    done = (
        all(b.status != BulkActionStatus.REQUESTED for b in backfills)
        and all(r.is_finished for r in runs)
        and not waiting_retry
    )
    if done or time.monotonic() > deadline:
        break
    time.sleep(3)


def row(r):
    return {"run_id": r.run_id, "status": r.status.value, "job": r.job_name,
            "backfill": r.tags.get("dagster/backfill"), "sensor": r.tags.get("dagster/sensor_name"),
            "container": r.tags.get("docker/container_id"), "image": r.tags.get("dagster/image"),
            "partition": r.tags.get("dagster/partition", r.tags.get("dagster/asset_partition_range_start")),
            "parent": r.tags.get("dagster/parent_run_id"), "retry": r.tags.get("dagster/retry_number")}


backfill_run_ids = {r.run_id for r in runs}
print(json.dumps({
    "backfills": {b.backfill_id: b.status.value for b in backfills},
    "runs": [row(r) for r in runs],
    # Everything else the instance holds: the demo's in-process runs (no container) and sensor runs.
    "other_runs": [row(r) for r in instance.get_runs() if r.run_id not in backfill_run_ids],
}))
sys.exit(0 if done else 1)
PY
kill "$EVENTS_PID" 2>/dev/null || true; EVENTS_PID=
cli heimdex status --json >"$LOG_DIR/status.json" 2>>"$LOG_DIR/runs.log" || true
owner=$(cli python -c 'from heimdex_assets.demo import demo_id; print(demo_id("owner/0"))')
cli heimdex search --owner-id "$owner" "boats at the harbor" --mode hybrid --json >"$LOG_DIR/search.json" 2>>"$LOG_DIR/runs.log" || true
smoke_s=$(elapsed $t0)

# --- verdict ------------------------------------------------------------------------------------
python3 - "$LOG_DIR" "$base_s" "$build_s" "$stack_s" "$smoke_s" "$((SECONDS - STARTED))" $([[ $KILL_ONE == 1 ]] && echo --kill-one) <<'PY'
import json, sys
from pathlib import Path

logs, base_s, build_s, stack_s, smoke_s, total_s = sys.argv[1:7]
read = lambda name: json.loads(Path(logs, name).read_text() or "null")
runs, demo, status, search = read("runs.json"), read("demo.json"), read("status.json"), read("search.json")
events = [line.split() for line in Path(logs, "run-containers.events").read_text().splitlines()]
started = {e[1] for e in events if e[0] == "start"}
exits = {e[1]: (e[3] if len(e) > 3 else "?") for e in events if e[0] == "die"}
problems = []
killed_file = Path(logs, "killed")
killed = killed_file.read_text().strip() if killed_file.exists() else None

print("backfill runs (reprocess --scope all --force through the admin API):")
for r in runs["runs"]:
    c = r["container"] or ""
    retry = f"  retry {r['retry']} of {r['parent'][:8]}" if r["parent"] else ""
    print(f"  {r['run_id'][:8]}  backfill {r['backfill']}  partition {str(r['partition'])[:8]}  {r['status']:<8}"
          f"  container {c[:12] or '-'}  exit {exits.get(c, '-')}  image {r['image']}{retry}")
    if killed and killed.startswith(c or "-"):  # killed on purpose: failed, retried to success in a new container
        children = [x for x in runs["runs"] if x["parent"] == r["run_id"]]
        ok = r["status"] == "FAILURE" and any(x["status"] == "SUCCESS" and x["container"] != c for x in children)
        print(f"    killed on purpose (exit {exits.get(c)}): {r['status']}, retried as "
              f"{', '.join(x['run_id'][:8] + ' ' + x['status'] for x in children) or 'nothing'}")
        if not ok:
            problems.append(f"killed run {r['run_id'][:8]} was not retried to success")
    elif r["status"] != "SUCCESS" or c not in started or exits.get(c) != "0":
        problems.append(f"run {r['run_id'][:8]}: {r['status']}, container {c[:12] or 'none'}, exit {exits.get(c)}")
containers = [r["container"] for r in runs["runs"]]
if "--kill-one" in sys.argv and not any(killed and killed.startswith(r["container"] or "-") for r in runs["runs"]):
    problems.append("--kill-one: no container of the reprocess's runs was killed")
if not containers:
    problems.append("the reprocess launched no run")
if len(set(containers)) != len(containers):
    problems.append("runs shared a container")
others = runs["other_runs"]
in_process = [r for r in others if not r["container"]]
sensor_runs = [r for r in others if r["container"]]
print(f"other runs: {len(in_process)} in-process (heimdex demo), {len(sensor_runs)} launched by sensors in containers "
      f"({', '.join(sorted({r['sensor'] or r['job'] for r in sensor_runs})) or 'none'}; "
      f"{sum(r['status'] == 'SUCCESS' for r in sensor_runs)} succeeded)")

partitions = {k: v["partitions"] for k, v in (status or {}).get("assets", {}).items()}
for asset, p in partitions.items():
    print(f"  {asset:<26} fresh {p['fresh']}  stale {p['stale']}  missing {p['missing']}  failed {p['failed']}")
    if p["stale"] or p["missing"] or p["failed"] or not p["fresh"]:
        problems.append(f"{asset} not all fresh: {p}")
if not partitions:
    problems.append("heimdex status gave nothing")
hits = len((search or {}).get("results", []))
if not hits:
    problems.append("search found nothing")

print(f"summary: services postgres(+pgvector) user-code webserver daemon admin-api on 127.0.0.1; "
      f"seeded {demo['videos']} videos / {demo['scenes']} scenes; {len(runs['backfills'])} backfills "
      f"{sorted(set(runs['backfills'].values()))}; {len(runs['runs'])} runs, {len(set(containers))} distinct containers, "
      f"{len(started)} run containers started in all; hybrid search hits {hits}")
print(f"times: base image {base_s}s, project image {build_s}s, stack start {stack_s}s, smoke {smoke_s}s, total {total_s}s")
if problems:
    print("FAILED: " + "; ".join(problems))
    sys.exit(1)
print("OK: every run of the reprocess ran in a container of its own (DockerRunLauncher) and succeeded"
      + (", the killed one through its retry" if killed else ""))
PY
