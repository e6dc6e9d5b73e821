#!/usr/bin/env bash
# All local services for tests: services.sh {up|down|status}
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "${1:-}" in
  up) "$HERE/mariadb.sh" up; "$HERE/kafka.sh" up ;;
  down) "$HERE/kafka.sh" down; "$HERE/mariadb.sh" down ;;
  status) rc=0; "$HERE/mariadb.sh" status || rc=1; "$HERE/kafka.sh" status || rc=1; exit $rc ;;
  *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
