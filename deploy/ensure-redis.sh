#!/usr/bin/env bash
# Make sure Redis is available for the service.
#   ensure-redis.sh                -> a Redis answers at HEIMDALL_REDIS_URL (default
#                                     redis://127.0.0.1:6379/0); start a local one if not
#   ensure-redis.sh --binary-only  -> only make sure `redis-server` is installed
#                                     (the tests start private servers on free ports)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
URL=${HEIMDALL_REDIS_URL:-redis://127.0.0.1:6379/0}

install_redis() {
  if command -v redis-server >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing: installing it with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing: installing it with sudo apt-get"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing and cannot be installed here." >&2
    echo "Install Redis >= 6 (Debian/Ubuntu: 'apt-get install redis-server'," >&2
    echo "macOS: 'brew install redis') or point HEIMDALL_REDIS_URL, CELERY_BROKER_URL" >&2
    echo "and CELERY_RESULT_BACKEND at a running Redis." >&2
    exit 1
  fi
}

answers() {
  "$PY" - "$URL" <<'PY' 2>/dev/null
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1).ping()
PY
}

if [ "${1:-}" = "--binary-only" ]; then
  install_redis
  exit 0
fi

if answers; then
  echo "Redis answers at $URL"
  exit 0
fi

port=$("$PY" -c "import sys, urllib.parse as u; print(u.urlparse(sys.argv[1]).port or 6379)" "$URL")
host=$("$PY" -c "import sys, urllib.parse as u; print(u.urlparse(sys.argv[1]).hostname or '127.0.0.1')" "$URL")
case "$host" in
  127.0.0.1|localhost|::1) ;;
  *) echo "No Redis answers at $URL (a remote host): start it there." >&2; exit 1 ;;
esac
install_redis
mkdir -p var/redis
echo "starting a local Redis on port $port (data in var/redis, log var/redis/redis.log)"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$PWD/var/redis" \
  --save "" --appendonly no --logfile "$PWD/var/redis/redis.log" --pidfile "$PWD/var/redis/redis.pid"
for _ in $(seq 1 50); do
  if answers; then echo "Redis answers at $URL"; exit 0; fi
  sleep 0.1
done
echo "Redis did not start; see var/redis/redis.log" >&2
exit 1
