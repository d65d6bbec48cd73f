"""The served model, per process.

Two kinds of process hold model state:

* the worker's **main process** resolves ``name@alias`` in the registry
  (``worker_init``, and again on ``heimdall_reload_model``): MLflow is imported
  and the version downloaded there, once, before the pool forks, so children
  inherit the :class:`~heimdall.registry.ResolvedModel` and start fast. It
  never creates an onnxruntime session (sessions must not cross a fork).
  When the registry cannot be reached at start, it serves the version this
  disk last resolved and verified (:func:`heimdall.registry.last_verified`),
  says so in every heartbeat and log line, and retries the registry in the
  background; once it answers, the worker reloads itself from it.
* each **pool child** builds its own :class:`~heimdall.runtime.Localizer` in
  ``worker_process_init`` and keeps a heartbeat record in Redis, under
  ``heimdall:workers:{hostname}`` field ``{pid}``, rewritten every
  ``heartbeat_interval_s`` with its state and time; ``/ready`` reads those
  records (no broadcast on the probe path) and the main process answers
  ``heimdall_model_status`` from them. A child that cannot load keeps running
  and answers every task with a 503 ``model-unavailable`` problem.
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

from heimdall import contract, registry
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

REGISTRY = "registry"
LOCAL_FALLBACK = "local-fallback"

workers_key = contract.workers_key


@dataclass
class _MainState:
    resolved: ResolvedModel | None = None
    error: str | None = None
    """Why the last resolution failed (None after a success)."""
    source: str = REGISTRY
    """Where the model in force came from: the registry, or this disk's last verified copy."""


@dataclass
class _ChildState:
    hostname: str | None = None
    localizer: Localizer | None = None
    error: str | None = None
    source: str = REGISTRY
    reported: bool = False
    loaded_at: float = 0.0
    """When this child finished trying to load its model, epoch seconds."""
    parent: int = 0
    """The main process this child was forked from (a heartbeat stops when it is gone)."""


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
    adopt(resolved)
    return resolved


def refuse(exc: BaseException) -> None:
    """Record why a candidate model was refused (the model in force stays)."""
    _main.error = _describe(exc)


def adopt(resolved: ResolvedModel) -> None:
    """Make ``resolved`` (from the registry) the model new children load."""
    _main.resolved, _main.error, _main.source = resolved, None, REGISTRY


def fall_back_main(settings: Settings) -> ResolvedModel | None:
    """Serve this disk's last verified version when the registry could not be read.

    Keeps the resolution error (so status and logs say why) and marks the
    source; returns None when there is no verified copy either.
    """
    try:
        resolved = registry.last_verified(settings)
    except Exception as exc:
        _main_startup_warnings.append(f"no local fallback model: {_describe(exc)}")
        return None
    _main.resolved, _main.source = resolved, LOCAL_FALLBACK
    _main.error = (
        f"registry unreachable ({_main.error}); serving the last locally verified "
        f"version {resolved.identity.version}"
    )
    return resolved


def main_source() -> str:
    """Where the model in force came from (``registry`` or ``local-fallback``)."""
    return _main.source


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
        fall_back_main(settings)
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
    if _main.resolved is not None and _main.source == LOCAL_FALLBACK:
        summary = registry.model_summary(_main.resolved)
        log.error(
            "REGISTRY UNREACHABLE: serving the last locally verified model %s; %s. "
            "Retrying the registry every %.0f s.",
            registry.dumps(summary),
            _main.error,
            settings.registry_retry_s,
        )
        threading.Thread(
            target=_retry_registry,
            args=(settings, getattr(sender, "hostname", None) or str(sender)),
            name="heimdall-registry-retry",
            daemon=True,
        ).start()
    elif _main.resolved is not None:
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


def _retry_registry(settings: Settings, hostname: str) -> None:
    """Until the registry answers, ask it again; then reload this worker from it.

    Runs in a thread of the main process. The reload itself is the control
    command (it restarts the pool in the consumer's thread), sent to this
    worker only.
    """
    from tasks import app

    while _main.source == LOCAL_FALLBACK:
        time.sleep(settings.registry_retry_s)
        try:
            identity = registry.resolve_version(settings)
        except Exception as exc:
            log.warning("registry still unreachable, serving the local fallback: %s", exc)
            continue
        log.info("registry answers again (%s): reloading from it", registry.dumps(identity))
        try:
            replies = app.control.broadcast(
                contract.RELOAD_COMMAND, destination=[hostname], reply=True, timeout=30, limit=1
            )
        except Exception as exc:
            log.warning("cannot ask this worker to reload: %s", exc)
            continue
        if any(r.get(hostname, {}).get("ok") for r in replies or [] if isinstance(r, dict)):
            return


# -- pool children ------------------------------------------------------------


@signals.worker_process_init.connect
def _on_process_init(sender: Any = None, **kwargs: Any) -> None:
    """Build this child's onnxruntime session and record its readiness."""
    global _redis
    _redis = None  # a connection must not be shared with the parent
    _child.hostname = str(sender) if sender else None
    _child.localizer, _child.error, _child.reported = None, None, False
    _child.parent = os.getppid()
    settings = get_settings()
    load_child(settings)
    _child.loaded_at = time.time()
    report_readiness()
    threading.Thread(
        target=_heartbeat,
        args=(settings.heartbeat_interval_s,),
        name="heimdall-heartbeat",
        daemon=True,
    ).start()


def _heartbeat(interval_s: float) -> None:
    # The record's time is what /ready trusts: rewritten every few seconds it
    # says "this process is alive now", whether or not it gets tasks. A child
    # whose main process died stops beating, so readiness drops within
    # heartbeat_timeout_s even if the orphan lingers.
    while os.getppid() == _child.parent:
        time.sleep(interval_s)
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
        _child.source = _main.source
        log.error("pid %d has no model, tasks answer 503: %s", os.getpid(), _child.error)
        return
    _child.source = _main.source
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
    """Write this child's heartbeat to ``heimdall:workers:{hostname}`` field ``{pid}``.

    ``{"state", "model", "error", "source", "loaded_at", "at"}`` with ``at`` the
    time of writing. Without ``force`` only when the last attempt failed (cheap
    to call per task). The hash expires unless some child keeps beating.
    """
    if _child.hostname is None or (_child.reported and not force):
        return
    settings = get_settings()
    loc = _child.localizer
    record = {
        "state": LOADED if loc is not None else FAILED,
        "model": loc.identity.to_dict() if loc is not None else None,
        "error": _main.error if loc is not None and _child.source != REGISTRY else _child.error,
        "source": _child.source,
        "loaded_at": _child.loaded_at,
        "at": time.time(),
    }
    key = workers_key(_child.hostname)
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            pipe.hset(key, str(os.getpid()), json.dumps(record))
            pipe.expire(key, max(1, int(settings.heartbeat_timeout_s * 3)))
            pipe.execute()
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
                    "source": record.get("source"),
                    "loaded_at": record.get("loaded_at"),
                    "at": record.get("at"),
                }
            )
    except redis.RedisError as exc:
        error = f"cannot read children readiness from Redis: {exc}"
    return {
        "hostname": hostname,
        "model": main_identity(),
        "source": _main.source,
        "error": error,
        "children": children,
    }
