#!/bin/sh
# Flower for Heimdall: `deploy/flower.sh` (from the repo root or the image's /app).
#
# Flower can revoke tasks, restart the worker pool, send arbitrary tasks and read
# every task's arguments and results, so it binds to loopback unless told
# otherwise, and it refuses to start on any other address with no password or
# with the shipped one (admin:heimdall).
#
# Environment (Flower reads the same names itself):
#   FLOWER_ADDRESS      address to bind (default 127.0.0.1)
#   FLOWER_PORT         port (default HEIMDALL_FLOWER_PORT, else 5555)
#   FLOWER_BASIC_AUTH   user:password[,user2:password2] (default admin:heimdall, loopback only)
#   FLOWER_BASIC_AUTH_FILE  a file holding FLOWER_BASIC_AUTH (a compose secret, a mounted
#                       Kubernetes Secret); read when FLOWER_BASIC_AUTH is not set
set -eu

if [ -z "${FLOWER_BASIC_AUTH:-}" ] && [ -n "${FLOWER_BASIC_AUTH_FILE:-}" ]; then
  FLOWER_BASIC_AUTH=$(tr -d '\r\n' < "$FLOWER_BASIC_AUTH_FILE")
fi

address=${FLOWER_ADDRESS:-127.0.0.1}
port=${FLOWER_PORT:-${HEIMDALL_FLOWER_PORT:-5555}}
auth=${FLOWER_BASIC_AUTH:-admin:heimdall}

case "$address" in
  127.*|localhost|::1|"[::1]") loopback=yes ;;
  *) loopback=no ;;
esac
if [ "$loopback" = no ]; then
  case ",$auth," in
    *,admin:heimdall,*)
      echo "flower: refusing to listen on $address with the shipped password admin:heimdall;" \
        "set FLOWER_BASIC_AUTH=user:a-long-random-password (or FLOWER_ADDRESS=127.0.0.1)" >&2
      exit 78 ;;
  esac
fi

# The credentials go through the environment, not argv (visible to every user in ps).
export FLOWER_BASIC_AUTH="$auth"
# PROMETHEUS_MULTIPROC_DIR belongs to the API: with it set, Flower's own
# prometheus_client would switch to file-backed values in the API's folder.
unset PROMETHEUS_MULTIPROC_DIR
exec celery -A tasks flower --address="$address" --port="$port"
