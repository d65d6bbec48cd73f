#!/usr/bin/env bash
# Make sure the Redis servers the service will use are there.
#
#   ensure-redis.sh                -> embedded mode (HEIMDALL_REDIS_URL unset): start the
#                                     project's own two servers under var/redis/ unless they
#                                     already answer, and write var/run.env for every process;
#                                     external mode (HEIMDALL_REDIS_URL set): check that every
#                                     URL the service will use answers, start nothing
#   ensure-redis.sh --binary-only  -> only make sure `redis-server` is installed
#                                     (the tests start private servers on free ports)
#   ensure-redis.sh --stop         -> stop the embedded servers (their data stays in var/redis)
#
# The embedded pair (docs/reliability.md):
#   state  127.0.0.1:${HEIMDALL_STATE_REDIS_PORT:-6390}  broker queues, results, job records,
#          payloads, heartbeats; AOF with appendfsync everysec; never evicts
#   cache  127.0.0.1:${HEIMDALL_CACHE_REDIS_PORT:-6391}  prediction cache only; maxmemory
#          ${HEIMDALL_CACHE_MAXMEMORY:-256mb} with allkeys-lru; no persistence
# Both require a password generated once into var/redis/password (mode 600).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VAR=${HEIMDALL_VAR_DIR:-var}
RUN_ENV="$VAR/run.env"
STATE_PORT=${HEIMDALL_STATE_REDIS_PORT:-6390}
CACHE_PORT=${HEIMDALL_CACHE_REDIS_PORT:-6391}
CACHE_MAXMEMORY=${HEIMDALL_CACHE_MAXMEMORY:-256mb}

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
    echo "Install Redis >= 7 (Debian/Ubuntu: 'apt-get install redis-server'," >&2
    echo "macOS: 'brew install redis') or point HEIMDALL_REDIS_URL (and optionally" >&2
    echo "HEIMDALL_CACHE_REDIS_URL, CELERY_BROKER_URL, CELERY_RESULT_BACKEND) at running servers." >&2
    exit 1
  fi
}

# answers URL -> exit 0 when a Redis answers PING there (credentials in the URL).
answers() {
  "$PY" - "$1" <<'PY' 2>/dev/null
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_timeout=1, socket_connect_timeout=1).ping()
PY
}

redact() { sed -E 's#(://[^:/@]*:)[^@]*@#\1***@#' <<<"$1"; }

case "${1:-}" in
  --binary-only) install_redis; exit 0 ;;
  --stop)
    for name in state cache; do
      pidfile="$VAR/redis/$name/redis.pid"
      if [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; then echo "stopped the $name Redis"; fi
    done
    exit 0 ;;
esac

if [ -n "${HEIMDALL_REDIS_URL:-}" ]; then
  # External mode: the operator chose the servers; check every URL the service uses.
  cache_url=${HEIMDALL_CACHE_REDIS_URL:-$("$PY" -c 'from heimdall.config import Settings; print(Settings().cache_url)')}
  failed=0
  for url in "$HEIMDALL_REDIS_URL" "$cache_url" "${CELERY_BROKER_URL:-$HEIMDALL_REDIS_URL}" \
             "${CELERY_RESULT_BACKEND:-$HEIMDALL_REDIS_URL}"; do
    if answers "$url"; then echo "Redis answers at $(redact "$url")"
    else echo "No Redis answers at $(redact "$url")" >&2; failed=1; fi
  done
  exit "$failed"
fi

install_redis
mkdir -p "$VAR/redis/state" "$VAR/redis/cache"
chmod 700 "$VAR/redis"
if [ ! -s "$VAR/redis/password" ]; then
  (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$VAR/redis/password")
  echo "generated a Redis password in $VAR/redis/password"
fi
password=$(cat "$VAR/redis/password")
base="redis://:$password@127.0.0.1"

# write_conf NAME PORT EXTRA... -> var/redis/NAME/redis.conf (mode 600: it holds the password)
write_conf() {
  local name=$1 port=$2; shift 2
  local dir; dir="$(cd "$VAR/redis/$name" && pwd)"
  (umask 077; {
    echo "port $port"
    echo "bind 127.0.0.1 -::1"
    echo "protected-mode yes"
    echo "requirepass $password"
    echo "dir $dir"
    echo "logfile $dir/redis.log"
    echo "pidfile $dir/redis.pid"
    echo "daemonize yes"
    printf '%s\n' "$@"
  } >"$VAR/redis/$name/redis.conf")
}

write_conf state "$STATE_PORT" \
  "appendonly yes" "appendfsync everysec" "save \"\"" "maxmemory-policy noeviction"
write_conf cache "$CACHE_PORT" \
  "appendonly no" "save \"\"" "maxmemory $CACHE_MAXMEMORY" "maxmemory-policy allkeys-lru"

for pair in "state:$STATE_PORT" "cache:$CACHE_PORT"; do
  name=${pair%%:*}; port=${pair##*:}
  if answers "$base:$port/0"; then echo "the $name Redis answers on port $port"; continue; fi
  echo "starting the $name Redis on port $port (data and log in $VAR/redis/$name)"
  redis-server "$VAR/redis/$name/redis.conf"
  for _ in $(seq 1 100); do answers "$base:$port/0" && break; sleep 0.1; done
  if ! answers "$base:$port/0"; then
    echo "the $name Redis did not start (is port $port taken?); see $VAR/redis/$name/redis.log" >&2
    exit 1
  fi
done

(umask 077; cat >"$RUN_ENV" <<EOF
# Written by deploy/ensure-redis.sh: the embedded Redis servers of this checkout.
HEIMDALL_REDIS_URL=$base:$STATE_PORT/0
CELERY_BROKER_URL=$base:$STATE_PORT/1
CELERY_RESULT_BACKEND=$base:$STATE_PORT/2
HEIMDALL_CACHE_REDIS_URL=$base:$CACHE_PORT/0
REDISCLI_AUTH=$password
EOF
)
echo "wrote $RUN_ENV (every process of make run, and the heimdall command, read it)"
