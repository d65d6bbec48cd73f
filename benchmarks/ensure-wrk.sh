#!/usr/bin/env bash
# Make sure the `wrk` load generator is installed (Debian package `wrk`), as
# deploy/ensure-redis.sh does for redis-server. Used by `make bench`.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "wrk is missing: installing it with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "wrk is missing: installing it with sudo apt-get"
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
else
  echo "wrk is missing and cannot be installed here." >&2
  echo "Install it (Debian/Ubuntu: 'apt-get install wrk', macOS: 'brew install wrk')." >&2
  exit 1
fi
command -v wrk >/dev/null
