#!/usr/bin/env bash
# Install the command-line checkers the tests use, when they are missing:
#   promtool        (Debian package `prometheus`)      promtool check/test rules
#   docker-compose  (Debian package `docker-compose`)  docker-compose config (no engine needed)
# As root with apt-get (or with sudo); otherwise say so and go on: the tests that need a
# missing tool skip with the reason.
set -uo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "missing ${need[*]} and no apt-get as root here: the tests that need them will skip" >&2
  exit 0
fi
echo "installing ${need[*]} with apt-get (for promtool / docker-compose config in the tests)"
if ! { "${SUDO[@]}" apt-get update -qq &&
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null; }; then
  echo "could not install ${need[*]}: the tests that need them will skip" >&2
fi
# The prometheus package starts a server on :9090 where systemd runs; the tests only
# need promtool.
exit 0
