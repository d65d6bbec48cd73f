"""The served model, per process.

Two kinds of process hold model state:

* the worker's **main process** resolves ``name@alias`` in the registry
  (``worker_init``, and again on ``heimdall_reload_model``): MLflow is imported
  and the version downloaded there, once, before the pool forks, so children
  inherit the :class:`~heimdall.registry.ResolvedModel` and start fast. It
  never creates an onnxruntime session (sessions must not cross a fork).
* each **pool child** builds its own :class:`~heimdall.runtime.Localizer` in
  ``worker_process_init`` and records whether it could in Redis, under
  ``heimdall:workers:{hostname}`` field ``{pid}``; the main process answers
  ``heimdall_model_status`` from that hash. A child that cannot load keeps
  running and answers every task with a 503 ``model-unavailable`` problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from celery import signals

from heimdall import registry
from heimdall.config import Settings, get_settings
from heimdall.errors import HeimdallError, ModelUnavailable
from heimdall.registry import ResolvedModel
from heimdall.stations import load_network

if TYPE_CHECKING:  # onnxruntime is imported in pool children only
    from heimdall.runtime import Localizer

log = logging.getLogger("heimdall.worker")

LOADED = "loaded"
FAILED = "failed"
STARTING = "starting"

READINESS_REFRESH_S = 10.0
"""How often a child rewrites its readiness record, seconds."""


def workers_key(hostname: str) -> str:
    """Redis hash holding the readiness of each pool child of worker ``hostname``."""
    return f"heimdall:workers:{hostname}"


@dataclass
class _MainState:
    resolved: ResolvedModel | None = None
    error: str | None = None
    """Why the last resolution failed (None after a success)."""


@dataclass
class _ChildState:
    hostname: str | None = None
    localizer: Localizer | None = None
    error: str | None = None
    reported: bool = False
    at: float = 0.0
    """When this child finished trying to load its model, epoch seconds."""


_main = _MainState()
_child = _ChildState()
_redis: redis.Redis | None = None
_main_startup_warnings: list[str] = []
"""Problems met before logging was set up, logged once it is."""
_main_startup_failure: list[Exception] = []
"""The start-up resolution's exception, if any (its traceback is logged when unexpected)."""


def redis_client() -> redis.Redis:
    """This process's client for the cache Redis (claim-check payloads, readiness)."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(
            get_settings().redis_url, socket_connect_timeout=2.0, socket_timeout=5.0
        )
    return _redis


def _describe(exc: BaseException) -> str:
    if isinstance(exc, HeimdallError):
        return exc.detail
    return f"{type(exc).__name__}: {exc}"


# -- main process -------------------------------------------------------------


def resolve_main(settings: Settings, alias: str | None = None) -> ResolvedModel:
    """Resolve and download ``name@alias`` and make it the model new children load.

    On failure the previous model (if any) stays in force and the error is
    recorded and re-raised.
    """
    try:
        resolved = registry.resolve(settings, alias)
    except Exception as exc:
        _main.error = _describe(exc)
        raise
    _main.resolved, _main.error = resolved, None
    return resolved


def main_identity() -> dict[str, Any] | None:
    """Identity of the model new children will load, None when there is none."""
    return _main.resolved.identity.to_dict() if _main.resolved else None


def main_error() -> str | None:
    """Why the last resolution in this process failed, None after a success."""
    return _main.error


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    """Resolve the model in the main process, before the pool forks."""
    settings = get_settings()
    try:
        resolve_main(settings)
    except Exception as exc:
        # Logged in _on_after_setup: logging is not configured yet here.
        _main_startup_failure.append(exc)
    hostname = getattr(sender, "hostname", None)
    if hostname:
        try:
            # Children of a previous run under the same name are gone.
            redis_client().delete(workers_key(hostname))
        except redis.RedisError as exc:
            _main_startup_warnings.append(f"cannot reset readiness in Redis: {exc}")


@signals.celeryd_after_setup.connect
def _on_after_setup(sender: Any = None, **kwargs: Any) -> None:
    """Log the outcome of the start-up resolution once logging is set up."""
    settings = get_settings()
    for warning in _main_startup_warnings:
        log.warning(warning)
    if _main.resolved is not None:
        summary = registry.model_summary(_main.resolved)
        log.info("model resolved for %s: %s", settings.model_uri, registry.dumps(summary))
    else:
        unexpected = [e for e in _main_startup_failure if not isinstance(e, HeimdallError)]
        log.error(
            "NO MODEL: %s could not be resolved from %s: %s. Pool children will answer "
            "503 model-unavailable; register a model, then broadcast heimdall_reload_model.",
            settings.model_uri,
            settings.tracking_uri,
            _main.error,
            exc_info=unexpected[0] if unexpected else None,
        )


# -- pool children ------------------------------------------------------------


@signals.worker_process_init.connect
def _on_process_init(sender: Any = None, **kwargs: Any) -> None:
    """Build this child's onnxruntime session and record its readiness."""
    global _redis
    _redis = None  # a connection must not be shared with the parent
    _child.hostname = str(sender) if sender else None
    _child.localizer, _child.error, _child.reported = None, None, False
    load_child(get_settings())
    _child.at = time.time()
    report_readiness()
    threading.Thread(target=_refresh_readiness, name="heimdall-readiness", daemon=True).start()


def _refresh_readiness() -> None:
    # Rewrite the record now and then: a Redis that restarted empty (or was
    # down when this child started) learns it again without waiting for a task,
    # so /ready does not stay false on an idle, healthy worker.
    while True:
        time.sleep(READINESS_REFRESH_S)
        report_readiness(force=True)


def load_child(settings: Settings) -> None:
    """Create the Localizer of this process from the model the main process resolved."""
    resolved = _main.resolved
    if resolved is None and _main.error is None:
        # worker_init did not run in this interpreter (spawn start method).
        try:
            resolved = resolve_main(settings)
        except Exception as exc:
            _child.error = _describe(exc)
    if resolved is None:
        _child.error = _child.error or (
            f"no model: {settings.model_uri} could not be resolved ({_main.error})"
        )
        log.error("pid %d has no model, tasks answer 503: %s", os.getpid(), _child.error)
        return
    started = time.perf_counter()
    try:
        from heimdall.runtime import Localizer

        _child.localizer = Localizer(
            resolved.onnx_path,
            resolved.card,
            load_network(settings.stations_file),
            resolved.identity,
            intra_op_threads=settings.onnx_intra_op_threads,
            inter_op_threads=settings.onnx_inter_op_threads,
        )
    except Exception as exc:
        # Keep the child alive: a raising initializer would make the pool
        # fork-and-die in a loop; answering 503 is observable and recoverable.
        _child.error = f"cannot load {resolved.onnx_path}: {_describe(exc)}"
        log.exception("pid %d has no model, tasks answer 503: %s", os.getpid(), _child.error)
        return
    log.info(
        "pid %d loaded %s version %s (alias %s) in %.0f ms (intra_op=%d inter_op=%d)",
        os.getpid(),
        resolved.identity.name,
        resolved.identity.version,
        resolved.identity.alias,
        (time.perf_counter() - started) * 1000.0,
        settings.onnx_intra_op_threads,
        settings.onnx_inter_op_threads,
    )


def report_readiness(*, force: bool = False) -> None:
    """Write this child's state to ``heimdall:workers:{hostname}`` field ``{pid}``.

    Without ``force`` only when the last attempt failed (cheap to call per task).
    """
    if _child.hostname is None or (_child.reported and not force):
        return
    loc = _child.localizer
    record = {
        "state": LOADED if loc is not None else FAILED,
        "model": loc.identity.to_dict() if loc is not None else None,
        "error": None if loc is not None else _child.error,
        "at": _child.at,
    }
    try:
        redis_client().hset(workers_key(_child.hostname), str(os.getpid()), json.dumps(record))
    except redis.RedisError as exc:
        if _child.reported or not force:  # warn once per outage, not every refresh
            log.warning("pid %d cannot record readiness in Redis: %s", os.getpid(), exc)
        _child.reported = False
        return
    _child.reported = True


def current_localizer() -> Localizer | HeimdallError:
    """This child's Localizer, or the error to answer with when it has none."""
    report_readiness()
    if _child.localizer is None:
        if _child.hostname is None and _child.error is None:
            # Not a prefork child (e.g. --pool=solo/threads): load in place, once.
            load_child(get_settings())
            if _child.localizer is not None:
                return _child.localizer
        return ModelUnavailable(_child.error or "this worker process has no model loaded")
    return _child.localizer


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid: int | None = None, **kwargs: Any) -> None:
    """Forget this child's readiness record."""
    if _child.hostname is None:
        return
    # On failure the main process prunes dead pids in heimdall_model_status.
    with contextlib.suppress(redis.RedisError):
        redis_client().hdel(workers_key(_child.hostname), str(pid or os.getpid()))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def status(hostname: str, pids: list[int]) -> dict[str, Any]:
    """Reply of ``heimdall_model_status``: the main process's model and each live child's."""
    children: list[dict[str, Any]] = []
    error = _main.error
    try:
        client = redis_client()
        raw = {_text(k): v for k, v in client.hgetall(workers_key(hostname)).items()}
        live = {str(p) for p in pids}
        stale = [field for field in raw if field not in live]
        if stale:
            client.hdel(workers_key(hostname), *stale)
        for pid in pids:
            entry = raw.get(str(pid))
            record = json.loads(entry) if entry else {"state": STARTING, "model": None}
            children.append(
                {
                    "pid": pid,
                    "state": record.get("state"),
                    "model": record.get("model"),
                    "error": record.get("error"),
                    "at": record.get("at"),
                }
            )
    except redis.RedisError as exc:
        error = f"cannot read children readiness from Redis: {exc}"
    return {
        "hostname": hostname,
        "model": main_identity(),
        "error": error,
        "children": children,
    }
