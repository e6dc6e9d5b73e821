#!/usr/bin/env bash
# Local single-node Kafka (KRaft) for tests: kafka.sh {up|down|status|restart}
# Broker on 127.0.0.1:9092, controller on 127.0.0.1:9093. Jars come from Maven Central.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"
KDIR="$STATE_DIR/kafka"
LIBS="$KDIR/libs"
DATA="$KDIR/data"
LOGS="$KDIR/logs"
PIDFILE="$STATE_DIR/kafka.pid"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BOOTSTRAP=127.0.0.1:9092
WAIT_UP=120    # seconds to wait for the broker to answer
WAIT_DOWN=30   # seconds to wait for a clean shutdown before KILL

log() { echo "kafka: $*" >&2; }

# The port check is instant; only then ask the broker itself for metadata.
reachable() {
  (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null || return 1
  [[ -x $PYTHON ]] || { log "no python at $PYTHON (set PYTHON)"; return 1; }
  "$PYTHON" "$HERE/wait_for_kafka.py" "$BOOTSTRAP" "${1:-5}"
}

our_pid() { pid_from "$PIDFILE" java; }

fetch_jars() {
  # Refetch when the pom changed; copy into a temp dir so a failed fetch leaves nothing half-done.
  local sum; sum="$(sha256sum <"$HERE/kafka/pom.xml" | cut -d' ' -f1)"
  [[ -f $LIBS/.pom.sha256 && "$(cat "$LIBS/.pom.sha256")" == "$sum" ]] && return 0
  log "fetching jars"
  rm -rf "$LIBS.tmp"
  mvn -q -B -f "$HERE/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" >"$KDIR/mvn.log" 2>&1 \
    || { cat "$KDIR/mvn.log" >&2; log "fetching jars failed"; exit 1; }
  echo "$sum" >"$LIBS.tmp/.pom.sha256"
  rm -rf "$LIBS" && mv "$LIBS.tmp" "$LIBS"
}

JAVA=(java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  -Dkafka.logs.dir="$LOGS" -Dlog4j2.configurationFile="$HERE/kafka/log4j2.properties" -cp "$LIBS/*")

start() {
  fetch_jars
  mkdir -p "$DATA" "$LOGS"
  sed "s|@LOG_DIRS@|$DATA|" "$HERE/kafka/server.properties" >"$KDIR/server.properties"
  if [[ ! -f $DATA/meta.properties ]]; then
    log "formatting $DATA"
    local id; id="$("${JAVA[@]}" kafka.tools.StorageTool random-uuid)"
    "${JAVA[@]}" kafka.tools.StorageTool format --standalone -t "$id" -c "$KDIR/server.properties" >/dev/null
  fi
  log "starting (logs: $LOGS)"
  # In a non-interactive shell the background child is no group leader, so setsid execs
  # in place and $! is the java pid.
  nohup setsid "${JAVA[@]}" kafka.Kafka "$KDIR/server.properties" \
    >"$LOGS/stdout.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
}

fail() {
  log "$1; last lines of the broker logs:"
  tail -n 40 "$LOGS/server.log" "$LOGS/stdout.log" >&2 2>/dev/null || true
  exit 1
}

up() {
  mkdir -p "$KDIR"
  if ! our_pid >/dev/null && reachable 5; then
    log "a broker already answers on $BOOTSTRAP, reusing"
    return 0
  fi
  [[ -x $PYTHON ]] || { log "no python at $PYTHON (set PYTHON)"; exit 1; }
  local pid
  if pid="$(our_pid)"; then log "already started (pid $pid)"; else start; fi
  local deadline=$((SECONDS + WAIT_UP))
  until "$PYTHON" "$HERE/wait_for_kafka.py" "$BOOTSTRAP" 2; do
    our_pid >/dev/null || { rm -f "$PIDFILE"; fail "broker exited during start-up"; }
    ((SECONDS < deadline)) || fail "broker not ready after ${WAIT_UP}s"
  done
  log "ready on $BOOTSTRAP"
}

down() {
  local pid
  if ! pid="$(our_pid)"; then
    rm -f "$PIDFILE"
    (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null && log "a broker is running that this script did not start; leaving it"
    return 0
  fi
  log "stopping pid $pid"
  stop_pid "$pid" java "$WAIT_DOWN"
  rm -f "$PIDFILE"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart) down; up ;;
  status) if reachable 5 >/dev/null; then echo "kafka: up"; else echo "kafka: down"; exit 1; fi ;;
  *) echo "usage: $0 {up|down|status|restart}" >&2; exit 2 ;;
esac
