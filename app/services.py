"""The per-app service objects (settings, Redis, Celery client, models, policy, counters).

Built once by :func:`app.create_app` and kept in ``app.extensions``; views
reach them through :func:`services`, never through module globals, so several
apps (tests) can live in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app
from redis import Redis

from app.cache import PredictionCache, make_redis
from app.dispatch import Dispatcher, make_celery
from app.metrics import ApiMetrics, LiveCounters
from app.model import ServedModels
from heimdall.config import Settings
from heimdall.traffic import PolicyMemo

EXTENSION = "heimdall"

PROBE_TIMEOUT_S = 2.0
"""Redis timeout of the readiness probe, seconds: a request's 0.25 s budget would call a
Redis that is merely slow on a saturated machine "down" and flap readiness."""


@dataclass(frozen=True)
class Services:
    """Everything a view needs besides the request."""

    settings: Settings
    redis: Redis
    """The state Redis: job records, payloads, worker heartbeats."""
    cache_redis: Redis
    """The prediction cache's Redis (may be another server, under maxmemory)."""
    probe_redis: Redis
    """The state Redis again, with the readiness probe's patience (a loaded machine is not down)."""
    broker_redis: Redis | None
    """Direct client of the broker (when it is Redis), for the readiness probe."""
    celery: Celery
    cache: PredictionCache
    dispatcher: Dispatcher
    model: ServedModels
    """The champion and extra served targets (``.current()``: the champion)."""
    policy: PolicyMemo
    """The traffic policy, read from the state Redis at most once a second."""
    metrics: ApiMetrics
    live: LiveCounters
    """Per-version live figures (requests, cache hits, latency), flushed to Redis each second."""

    @classmethod
    def build(cls, settings: Settings, metrics: ApiMetrics) -> Services:
        """Create the clients (no connection is opened until first use)."""
        client = make_redis(settings)
        cache_client = make_redis(settings, settings.cache_url)
        celery = make_celery(settings)
        return cls(
            settings=settings,
            redis=client,
            cache_redis=cache_client,
            probe_redis=make_redis(settings, timeout_s=PROBE_TIMEOUT_S),
            broker_redis=make_redis(settings, settings.broker_url, timeout_s=PROBE_TIMEOUT_S)
            if settings.broker_url.startswith(("redis://", "rediss://", "unix://"))
            else None,
            celery=celery,
            cache=PredictionCache(cache_client, settings, metrics),
            dispatcher=Dispatcher(settings, celery, client),
            model=ServedModels(settings),
            policy=PolicyMemo(client, settings.model_alias),
            metrics=metrics,
            live=LiveCounters(client, settings.model_name),
        )


def services(app: Flask | None = None) -> Services:
    """The services of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    found: Services = target.extensions[EXTENSION]
    return found
