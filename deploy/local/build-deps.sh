#!/usr/bin/env bash
# Installs the Debian packages that `pip install mysqlclient` needs to build, if missing.
set -euo pipefail
missing=()
for pkg in default-libmysqlclient-dev pkg-config build-essential; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "installing build dependencies: ${missing[*]}"
if [[ $(id -u) -ne 0 ]]; then
  echo "need root to apt-get install ${missing[*]}; install them and run again" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
