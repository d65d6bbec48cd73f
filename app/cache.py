"""The prediction cache in Redis, and the Redis client the API shares.

The cache is an optimization: when Redis is slow or down, every operation is
logged and treated as a miss (or a skipped write) and the request is still
served by the workers. Short socket timeouts keep a dead Redis from eating the
request's time budget, and after a failure the cache stays off for a moment
rather than paying the timeout again on every request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis

from app.metrics import ApiMetrics
from heimdall import contract
from heimdall.config import Settings

log = logging.getLogger("heimdall.api.cache")

BACKOFF_S = 1.0
"""After a Redis error the cache is skipped this long (seconds) before trying again."""


def make_redis(
    settings: Settings, url: str | None = None, timeout_s: float | None = None
) -> redis.Redis:
    """Redis client (default: ``redis_url``: payloads, jobs, heartbeats) with short timeouts."""
    timeout = timeout_s or settings.redis_socket_timeout_s
    return redis.Redis.from_url(
        url or settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )


prediction_key = contract.prediction_key


class PredictionCache:
    """Cached prediction results keyed by model version and input digest."""

    def __init__(self, client: redis.Redis, settings: Settings, metrics: ApiMetrics) -> None:
        self.client = client
        self.ttl_s = settings.cache_ttl_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._skip_until = 0.0

    @property
    def enabled(self) -> bool:
        """False when the TTL is 0 (cache disabled by configuration)."""
        return self.ttl_s > 0

    def _available(self) -> bool:
        return self.enabled and time.monotonic() >= self._skip_until

    def _failed(self, operation: str, exc: Exception) -> None:
        self.metrics.cache_errors.inc()
        with self._lock:
            already_off = time.monotonic() < self._skip_until
            self._skip_until = time.monotonic() + BACKOFF_S
        if not already_off:
            log.warning(
                "cache unavailable, serving without it",
                extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}"},
            )

    def get(self, model_name: str, version: str, digest: str) -> dict[str, Any] | None:
        """The cached result for this input and model version, or None on a miss."""
        return self.get_many(model_name, version, [digest])[0]

    def get_body(self, model_name: str, version: str, body_digest: str) -> dict[str, Any] | None:
        """The cached result for a request body's exact bytes (a hit counts; a miss does not).

        A miss is followed by the canonical lookup, which counts it.
        """
        if not self._available():
            return None
        key = contract.body_key(model_name, version, body_digest)
        try:
            raw = self.client.get(key)
        except (redis.RedisError, OSError) as exc:
            self._failed("get", exc)
            return None
        if raw is None:
            return None
        try:
            found: dict[str, Any] = orjson.loads(raw)
        except ValueError:
            log.warning("unreadable cache entry ignored", extra={"key": key})
            return None
        self.metrics.cache_hits.inc()
        return found

    def put_body(self, body_digest: str, result: dict[str, Any]) -> None:
        """Also answer these exact body bytes with ``result`` (errors logged, never raised)."""
        self._put([(contract.body_key, body_digest, result)])

    def get_many(
        self, model_name: str, version: str, digests: Sequence[str]
    ) -> list[dict[str, Any] | None]:
        """Cached results for several inputs (one round trip); None where missing."""
        if not digests:
            return []
        found: list[dict[str, Any] | None] = [None] * len(digests)
        if self._available():
            keys = [prediction_key(model_name, version, d) for d in digests]
            try:
                raw = self.client.mget(keys)
            except (redis.RedisError, OSError) as exc:
                self._failed("get", exc)
            else:
                for i, value in enumerate(raw):
                    if value is None:
                        continue
                    try:
                        found[i] = orjson.loads(value)
                    except ValueError:
                        log.warning("unreadable cache entry ignored", extra={"key": keys[i]})
        hits = sum(value is not None for value in found)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(found) - hits)
        return found

    def put(self, digest: str, result: dict[str, Any], body_digest: str | None = None) -> None:
        """Store a worker's result under the version that produced it (its ``model`` field).

        With ``body_digest`` the request body's exact bytes answer it too.
        """
        entries: list[tuple[Callable[[str, str, str], str], str, dict[str, Any]]] = [
            (prediction_key, digest, result)
        ]
        if body_digest is not None:
            entries.append((contract.body_key, body_digest, result))
        self._put(entries)

    def put_many(self, entries: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Store several results in one round trip; errors are logged, never raised."""
        self._put([(prediction_key, digest, result) for digest, result in entries])

    def _put(
        self, entries: Sequence[tuple[Callable[[str, str, str], str], str, dict[str, Any]]]
    ) -> None:
        if not entries or not self._available():
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key_of, digest, result in entries:
                    model = result.get("model") or {}
                    if not model.get("name") or not model.get("version"):
                        continue
                    key = key_of(str(model["name"]), str(model["version"]), digest)
                    pipe.set(key, orjson.dumps(result), ex=self.ttl_s)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed("set", exc)
