#!/bin/sh
# Entry point of the Heimdall image: puts the Redis password into the Redis URLs, then
# runs the command (gunicorn, celery, deploy/flower.sh, heimdall ...).
#
# REDIS_PASSWORD_FILE (a compose secret or a mounted Kubernetes Secret) names a file
# holding the password; each of HEIMDALL_REDIS_URL, HEIMDALL_CACHE_REDIS_URL,
# CELERY_BROKER_URL and CELERY_RESULT_BACKEND that is a redis:// URL without
# credentials gets ":PASSWORD@" after its scheme. The password is never in the image,
# the compose file or a ConfigMap, and never on a command line. Use a URL-safe one
# (e.g. `openssl rand -hex 32`). Without REDIS_PASSWORD_FILE the URLs are used as given.
set -eu

if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
  if [ ! -r "$REDIS_PASSWORD_FILE" ]; then
    echo "entrypoint: REDIS_PASSWORD_FILE=$REDIS_PASSWORD_FILE is not readable" >&2
    exit 78
  fi
  password=$(tr -d '\r\n' < "$REDIS_PASSWORD_FILE")
  if [ -z "$password" ]; then
    echo "entrypoint: $REDIS_PASSWORD_FILE is empty" >&2
    exit 78
  fi
  for name in HEIMDALL_REDIS_URL HEIMDALL_CACHE_REDIS_URL CELERY_BROKER_URL CELERY_RESULT_BACKEND; do
    eval "url=\${$name:-}"
    case "$url" in
      redis://*@*|rediss://*@*|"") ;;
      redis://*) export "$name=redis://:${password}@${url#redis://}" ;;
      rediss://*) export "$name=rediss://:${password}@${url#rediss://}" ;;
    esac
  done
  unset password url
fi

exec "$@"
