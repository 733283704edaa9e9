#!/usr/bin/env bash
# Run a real single-node OpenSearch (integ-test-zip from Maven Central) for the tests.
# Usage: scripts/opensearch.sh start|stop|status|url
# Env: HEIMDEX_CACHE_DIR (default ~/.cache/heimdex), HEIMDEX_OPENSEARCH_PORT (default 9250),
#      HEIMDEX_OPENSEARCH_VERSION (space-separated candidates), OPENSEARCH_JAVA_OPTS,
#      HEIMDEX_OPENSEARCH_WAIT (seconds, default 120). As root the node runs as system user 'heimdex'.
set -euo pipefail
shopt -s nullglob

# As root, the cache sits outside /root (mode 700), which the service user could not enter.
if [[ "$(id -u)" -eq 0 ]]; then default_cache=/var/cache/heimdex; else default_cache="$HOME/.cache/heimdex"; fi
CACHE_DIR="$(realpath -m "${HEIMDEX_CACHE_DIR:-$default_cache}")"
PORT="${HEIMDEX_OPENSEARCH_PORT:-9250}"
TRANSPORT_PORTS="$((PORT + 100))-$((PORT + 149))"
VERSIONS="${HEIMDEX_OPENSEARCH_VERSION:-2.19.6 2.19.5 2.19.4 2.19.3 2.19.2 2.19.1 2.19.0}"
JAVA_OPTS="${OPENSEARCH_JAVA_OPTS:--Xms256m -Xmx512m}"
WAIT_SECS="${HEIMDEX_OPENSEARCH_WAIT:-120}"
RUN_USER=heimdex
CLUSTER=heimdex-test
URL="http://127.0.0.1:${PORT}"

log() { echo "opensearch.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
is_root() { [[ "$(id -u)" -eq 0 ]]; }
as_user() { if is_root; then runuser -u "$RUN_USER" -- "$@"; else "$@"; fi; }
java_home() {  # OpenSearch's launcher has no PATH fallback, only *JAVA_HOME or a bundled jdk
  local j="${OPENSEARCH_JAVA_HOME:-${JAVA_HOME:-}}"
  if [[ -z "$j" ]]; then
    j="$(command -v java)" || die "java not found (install Java 17/21 or set JAVA_HOME)"
    j="$(dirname "$(dirname "$(readlink -f "$j")")")"
  fi
  echo "$j"
}
pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
healthy() {
  local body
  body="$(curl -fsS --max-time 5 "$URL/_cluster/health" 2>/dev/null)" || return 1
  [[ "$body" =~ \"status\":\"(green|yellow)\" ]]
}
running_pidfile() {  # prints the pidfile of a live node (any cached version)
  local pf
  for pf in "$CACHE_DIR"/opensearch-*/run/opensearch.pid; do
    if pid_alive "$pf"; then echo "$pf"; return 0; fi
  done
  return 1
}

fail() {  # fail <home> <message>: one-line error + last 30 lines of the node log
  local home="$1"; shift
  log "ERROR: $* (logs in $home/logs)"
  tail -n 30 "$home/logs/$CLUSTER.log" "$home/logs/launcher.out" >&2 2>/dev/null || true
  exit 1
}

mvn_copy() {  # mvn_copy <groupId:artifactId:version:type> <dir>
  (cd "$2" && mvn -B -q org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy -Dartifact="$1" \
    -DoutputDirectory="$2" </dev/null >>"$2/mvn.log" 2>&1)
}

fetch_dist() {  # prints the version home dir ($CACHE_DIR/opensearch-<v>) holding the unpacked tree
  local v dir tree
  for v in $VERSIONS; do  # reuse an already unpacked tree
    if [[ -x "$CACHE_DIR/opensearch-$v/opensearch-$v/bin/opensearch" ]]; then echo "$CACHE_DIR/opensearch-$v"; return 0; fi
  done
  command -v mvn >/dev/null || die "mvn not found (needed to download OpenSearch from Maven Central)"
  command -v unzip >/dev/null || die "unzip not found (e.g. apt-get install -y unzip)"
  for v in $VERSIONS; do
    dir="$CACHE_DIR/opensearch-$v"
    mkdir -p "$dir"
    log "downloading OpenSearch $v (integ-test-zip + analysis-common) from Maven Central into $dir ..."
    if mvn_copy "org.opensearch.distribution.integ-test-zip:opensearch:$v:zip" "$dir" &&
      mvn_copy "org.opensearch.plugin:analysis-common:$v:jar" "$dir"; then
      rm -rf "$dir/unpack.tmp"
      unzip -q "$dir/opensearch-$v.zip" -d "$dir/unpack.tmp"
      # integ-test-zip ships only transport-netty4; add the analysis-common module (english,
      # snowball, stemmers, ...) as a plugin (a module name can't be used for a plugin)
      tree="$dir/unpack.tmp/opensearch-$v/plugins/heimdex-analysis-common"
      mkdir -p "$tree" && cp "$dir/analysis-common-$v.jar" "$tree/"
      printf '%s\n' "description=analysis-common module, repackaged as a plugin" "version=$v" \
        "name=heimdex-analysis-common" "classname=org.opensearch.analysis.common.CommonAnalysisPlugin" \
        "java.version=11" "opensearch.version=$v" "extended.plugins=" >"$tree/plugin-descriptor.properties"
      mv "$dir/unpack.tmp/opensearch-$v" "$dir/opensearch-$v" && rm -rf "$dir/unpack.tmp"
      echo "$dir"; return 0
    fi
    log "OpenSearch $v could not be downloaded (see $dir/mvn.log), trying the next version"
  done
  die "could not download any OpenSearch version of: $VERSIONS"
}

prepare_root() {  # create the service user, let it reach and own the version home
  local home="$1" d="" part parts
  id "$RUN_USER" >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$RUN_USER"
  IFS=/ read -ra parts <<<"${home#/}"
  for part in "${parts[@]}"; do  # e.g. /root is 0700: grant traversal (x only, no listing)
    d="$d/$part"
    runuser -u "$RUN_USER" -- test -x "$d" || { log "chmod o+x $d (so '$RUN_USER' can reach $home)"; chmod o+x "$d"; }
  done
  chown -R "$RUN_USER:" "$home"
}

stop_node() {
  local pf pid i
  for pf in "$CACHE_DIR"/opensearch-*/run/opensearch.pid; do
    if pid_alive "$pf"; then
      pid="$(cat "$pf")"
      log "stopping OpenSearch (pid $pid)"
      kill "$pid"
      for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      if kill -0 "$pid" 2>/dev/null; then log "pid $pid still alive after 60s, sending SIGKILL"; kill -9 "$pid"; fi
    fi
    rm -f "$pf"
  done
}

start_node() {
  local home v pidfile jhome seen=0 t0
  command -v curl >/dev/null || die "curl not found"
  jhome="$(java_home)"
  if pidfile="$(running_pidfile)"; then
    home="$(dirname "$(dirname "$pidfile")")"
  else
    home="$(fetch_dist)"
    v="${home##*/opensearch-}"
    pidfile="$home/run/opensearch.pid"
    healthy && die "something else already answers on $URL; set HEIMDEX_OPENSEARCH_PORT"
    mkdir -p "$home/data" "$home/logs" "$home/run"
    rm -f "$pidfile"
    if is_root; then prepare_root "$home"; fi
    log "starting OpenSearch $v on $URL (heap opts: $JAVA_OPTS) ..."
    (cd "$home/opensearch-$v" && as_user env OPENSEARCH_JAVA_OPTS="$JAVA_OPTS" OPENSEARCH_JAVA_HOME="$jhome" \
        ./bin/opensearch -d -p "$pidfile" -Ecluster.name="$CLUSTER" -Enode.name="$CLUSTER-node" \
        -Enetwork.host=127.0.0.1 -Ehttp.port="$PORT" -Etransport.port="$TRANSPORT_PORTS" \
        -Ediscovery.type=single-node -Ecluster.routing.allocation.disk.threshold_enabled=false \
        -Epath.data="$home/data" -Epath.logs="$home/logs" \
        </dev/null >"$home/logs/launcher.out" 2>&1) || fail "$home" "OpenSearch launcher failed"
  fi
  t0=$SECONDS
  until healthy; do
    if [[ -s "$pidfile" ]]; then seen=1; fi  # the node writes it early and deletes it on exit
    if ! pid_alive "$pidfile" && ((seen || SECONDS - t0 > 30)); then fail "$home" "OpenSearch exited during startup"; fi
    if ((SECONDS - t0 >= WAIT_SECS)); then
      stop_node
      fail "$home" "OpenSearch not healthy at $URL after ${WAIT_SECS}s"
    fi
    sleep 1
  done
  echo "$URL"
}

case "${1:-}" in
  start) start_node ;;
  stop) stop_node ;;
  status) if running_pidfile >/dev/null && healthy; then echo "running: $URL"; else echo "not running" >&2; exit 1; fi ;;
  url) echo "$URL" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
