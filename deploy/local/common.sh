# shellcheck shell=bash disable=SC2034
# Shared helpers for the local service scripts (sourced, not run).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${SMW_SERVICES_DIR:-$ROOT/.services}"

# True if pid is a live (not zombie) process whose command name is $2.
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ $stat == *"($2) "[^Z]* ]]
}

# Print the pid in pidfile $1 if it is a live process named $2.
pid_from() {
  [[ -f $1 ]] || return 1
  local pid; pid="$(cat "$1")"
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" "$2" && echo "$pid"
}

# stop_pid PID NAME SECONDS: TERM, wait up to SECONDS, then KILL.
stop_pid() {
  local pid=$1 name=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < $3 * 5; i++)); do
    alive "$pid" "$name" || return 0
    sleep 0.2
  done
  echo "$name: still running after $3 s, sending KILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do alive "$pid" "$name" || return 0; sleep 0.2; done
}
