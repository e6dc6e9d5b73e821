#!/usr/bin/env bash
# Local MariaDB for tests: mariadb.sh {up|down|status|restart}
# Listens on 127.0.0.1:3306; root over TCP with an empty password; databases smw and smw_test.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PIDFILE="$STATE_DIR/mariadb.pid"
LOG="$STATE_DIR/mariadb.log"
MARIADBD=/usr/sbin/mariadbd
WAIT_UP=60     # seconds to wait for the server to answer
WAIT_DOWN=60   # seconds to wait for a clean shutdown before KILL

log() { echo "mariadb: $*" >&2; }

ping_tcp() { mariadb-admin -uroot -h127.0.0.1 -P3306 --connect-timeout=2 ping >/dev/null 2>&1; }
ping_sock() { mariadb-admin -uroot --connect-timeout=2 ping >/dev/null 2>&1; }
reachable() { command -v mariadb-admin >/dev/null && { ping_tcp || ping_sock; }; }

our_pid() { pid_from "$PIDFILE" mariadbd; }

install() {
  log "installing packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    mariadb-server default-libmysqlclient-dev pkg-config >/dev/null
  # Without systemd the package may start a server through its init script; stop it so
  # that the one running is always the one this script started (and can restart).
  if ping_sock && [[ -x /etc/init.d/mariadb ]]; then /etc/init.d/mariadb stop >/dev/null || true; fi
}

configure() {
  # Socket login works for root on this machine; TCP works once the ALTER has run.
  local sql="ALTER USER root@localhost IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
    FLUSH PRIVILEGES;
    SET GLOBAL max_connections = 500;
    CREATE DATABASE IF NOT EXISTS smw CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
    CREATE DATABASE IF NOT EXISTS smw_test CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;"
  mariadb -uroot -e "$sql" 2>/dev/null || mariadb -uroot -h127.0.0.1 -P3306 -e "$sql"
}

up() {
  mkdir -p "$STATE_DIR"
  if reachable; then
    log "already running, reusing"
  else
    [[ -x $MARIADBD ]] || install
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    log "starting (log: $LOG)"
    start-stop-daemon --start --background --make-pidfile --pidfile "$PIDFILE" \
      --output "$LOG" --exec "$MARIADBD" -- \
      --user=mysql --bind-address=127.0.0.1 --port=3306 --max-connections=500
    local i
    for ((i = 0; i < WAIT_UP; i++)); do
      ping_sock && break
      our_pid >/dev/null || { log "server exited during start-up:"; tail -n 30 "$LOG" >&2; exit 1; }
      sleep 1
    done
    ping_sock || { log "not answering after ${WAIT_UP}s:"; tail -n 30 "$LOG" >&2; exit 1; }
  fi
  configure
  log "ready on 127.0.0.1:3306"
}

down() {
  local pid
  if ! pid="$(our_pid)"; then
    rm -f "$PIDFILE"
    reachable && log "a server is running that this script did not start; leaving it"
    return 0
  fi
  log "stopping pid $pid"
  stop_pid "$pid" mariadbd "$WAIT_DOWN"
  rm -f "$PIDFILE"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart) down; up ;;
  status) if reachable; then echo "mariadb: up"; else echo "mariadb: down"; exit 1; fi ;;
  *) echo "usage: $0 {up|down|status|restart}" >&2; exit 2 ;;
esac
