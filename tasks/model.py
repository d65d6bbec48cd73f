"""The served models, per process.

A worker serves its champion (``settings.model_alias``) and the versions of
``settings.extra_models`` (aliases, or explicit version numbers) that resolve;
one that does not is skipped with a log line, never fatal. Two kinds of
process hold model state:

* the worker's **main process** resolves ``name@alias`` in the registry
  (``worker_init``, and again on ``heimdall_reload_model``): MLflow is imported
  and the version downloaded there, once, before the pool forks, so children
  inherit the :class:`~heimdall.registry.ResolvedModel` of every served
  version and start fast. It never creates an onnxruntime session (sessions
  must not cross a fork).
  When the registry cannot be reached at start, it serves the version this
  disk last resolved and verified (:func:`heimdall.registry.last_verified`),
  says so in every heartbeat and log line, and retries the registry in the
  background; once it answers, the worker reloads itself from it.
* each **pool child** builds its own :class:`~heimdall.runtime.Localizer` per
  served version in ``worker_process_init`` (a job picks one, the champion
  answering when it cannot: :class:`tasks.jobs.Served`) and keeps a heartbeat
  record in Redis, under ``heimdall:workers:{hostname}`` field ``{pid}``, rewritten every
  ``heartbeat_interval_s`` with its state and time; ``/ready`` reads those
  records (no broadcast on the probe path) and the main process answers
  ``heimdall_model_status`` from them. A child that cannot load keeps running
  and answers every task with a 503 ``model-unavailable`` problem.

SIGHUP to the main process reloads the served set like ``heimdall_reload_model``
(Celery's own SIGHUP handler, which re-executes the whole worker, is replaced
once the worker is ready): the handler only wakes a thread, which sends the
control command to this worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import signals

from heimdall import contract, registry
from heimdall.config import Settings, get_settings
from heimdall.errors import HeimdallError, ModelUnavailable
from heimdall.registry import ResolvedModel
from heimdall.stations import load_network
from tasks.jobs import Served

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
    extras: dict[str, ResolvedModel] = field(default_factory=dict)
    """Served target (``extra_models`` entry) -> its version, besides the champion."""
    extra_errors: dict[str, str] = field(default_factory=dict)
    """Served target -> why this worker does not hold it (not registered, refused)."""


@dataclass
class _ChildState:
    hostname: str | None = None
    localizer: Localizer | None = None
    """The champion's."""
    extras: dict[str, Localizer] = field(default_factory=dict)
    """Served target -> its Localizer, besides the champion."""
    error: str | None = None
    """Why this child has no champion."""
    errors: dict[str, str] = field(default_factory=dict)
    """Served target -> why this child does not hold it."""
    served: Served | None = None
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


def resolve_extras(
    settings: Settings, champion: str | None = None
) -> tuple[dict[str, ResolvedModel], dict[str, str], dict[str, str]]:
    """Resolve and download ``settings.extra_models``: (resolved, skipped, failed).

    ``skipped``: targets the registry does not know (target -> why), not an
    error; ``failed``: targets that resolved but whose files cannot be fetched
    or do not match their card. ``champion`` (default: the configured alias)
    is not resolved twice.
    """
    champion = champion or settings.model_alias
    resolved: dict[str, ResolvedModel] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for target in dict.fromkeys(settings.extra_models):
        if target == champion:
            continue
        try:
            identity = registry.resolve_target(settings, target)
        except Exception as exc:
            skipped[target] = _describe(exc)
            continue
        try:
            resolved[target] = registry.fetch(settings, identity)
        except Exception as exc:
            failed[target] = f"version {identity.version}: {_describe(exc)}"
    return resolved, skipped, failed


def adopt_extras(extras: dict[str, ResolvedModel], errors: dict[str, str]) -> None:
    """Make ``extras`` the versions new children hold besides the champion."""
    _main.extras, _main.extra_errors = dict(extras), dict(errors)


def main_extras() -> dict[str, ResolvedModel]:
    """Served target -> version new children load besides the champion."""
    return dict(_main.extras)


def main_models() -> list[dict[str, Any]]:
    """Identity of every version new children load, the champion first."""
    champion = [_main.resolved.identity.to_dict()] if _main.resolved else []
    return champion + [r.identity.to_dict() for r in _main.extras.values()]


def main_extra_errors() -> dict[str, str]:
    """Served target -> why this worker does not hold it."""
    return dict(_main.extra_errors)


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
    if _main.source == REGISTRY:
        extras, skipped, failed = resolve_extras(settings)
        adopt_extras(extras, {**skipped, **failed})
    else:
        # The registry is down: the retry thread reloads the whole set once it answers.
        adopt_extras({}, dict.fromkeys(settings.extra_models, "registry unreachable"))
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
    for target, resolved in _main.extras.items():
        log.info("extra model %s resolved: %s", target, registry.dumps(resolved.identity.to_dict()))
    for target, why in _main.extra_errors.items():
        log.warning("extra model %s not served: %s", target, why)


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
    _child.extras, _child.errors, _child.served = {}, {}, None
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
    """Create the Localizers of this process from the versions the main process resolved."""
    _load_champion(settings)
    _child.errors = dict(_main.extra_errors)
    if _child.localizer is None:
        _child.errors[settings.model_alias] = _child.error or "not loaded"
    for target, resolved in _main.extras.items():
        try:
            _child.extras[target] = _localizer(settings, resolved)
        except Exception as exc:
            _child.errors[target] = f"cannot load {resolved.onnx_path}: {_describe(exc)}"
            log.exception("pid %d cannot load extra model %s", os.getpid(), target)
    champion: Localizer | HeimdallError = (
        _child.localizer
        if _child.localizer is not None
        else ModelUnavailable(_child.error or "this worker process has no model loaded")
    )
    held = [loc for loc in [_child.localizer, *_child.extras.values()] if loc is not None]
    _child.served = Served(
        champion=champion,
        versions={loc.identity.version: loc for loc in reversed(held)},
        aliases={str(loc.identity.alias): loc for loc in held},
        failed=dict(_child.errors),
    )


def _localizer(settings: Settings, resolved: ResolvedModel) -> Localizer:
    from heimdall.runtime import Localizer

    started = time.perf_counter()
    localizer = Localizer(
        resolved.onnx_path,
        resolved.card,
        load_network(settings.stations_file),
        resolved.identity,
        intra_op_threads=settings.onnx_intra_op_threads,
        inter_op_threads=settings.onnx_inter_op_threads,
    )
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
    return localizer


def _load_champion(settings: Settings) -> None:
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
    try:
        _child.localizer = _localizer(settings, resolved)
    except Exception as exc:
        # Keep the child alive: a raising initializer would make the pool
        # fork-and-die in a loop; answering 503 is observable and recoverable.
        _child.error = f"cannot load {resolved.onnx_path}: {_describe(exc)}"
        log.exception("pid %d has no model, tasks answer 503: %s", os.getpid(), _child.error)


def report_readiness(*, force: bool = False) -> None:
    """Write this child's heartbeat to ``heimdall:workers:{hostname}`` field ``{pid}``.

    ``{"state", "model", "models", "errors", "error", "source", "loaded_at", "at"}``
    with ``model`` the champion's identity, ``models`` the identity of every
    version held, ``errors`` served target -> why it is not held, ``at`` the
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
        "models": [held.identity.to_dict() for held in _held()],
        "errors": _child.errors,
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


def _held() -> list[Localizer]:
    return [loc for loc in [_child.localizer, *_child.extras.values()] if loc is not None]


def current_served() -> Served:
    """The versions this child holds (the champion may be the error to answer with)."""
    report_readiness()
    if _child.served is None:
        # Not a prefork child (e.g. --pool=solo/threads): load in place, once.
        load_child(get_settings())
    assert _child.served is not None
    return _child.served


def current_localizer() -> Localizer | HeimdallError:
    """This child's champion Localizer, or the error to answer with when it has none."""
    return current_served().champion


def held_localizers() -> list[Localizer]:
    """Every Localizer this child holds, the champion first."""
    return _held()


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
    """Reply of ``heimdall_model_status``: the main process's models and each live child's."""
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
                    "models": record.get("models", []),
                    "errors": record.get("errors", {}),
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
        "models": main_models(),
        "errors": main_extra_errors(),
        "source": _main.source,
        "error": error,
        "children": children,
    }


# -- SIGHUP -------------------------------------------------------------------

_hup = threading.Event()
_hup_listener: list[threading.Thread] = []


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """Replace Celery's SIGHUP handler (re-execute the worker) with a reload of the models."""
    from celery import platforms

    hostname = getattr(sender, "hostname", None)
    if not hostname or threading.current_thread() is not threading.main_thread():
        return
    # The handler only sets an event: a broadcast (locks, sockets) must not
    # run inside a signal handler.
    platforms.signals["SIGHUP"] = _on_sighup
    if _hup_listener:  # the consumer became ready again (after a broker outage)
        return
    listener = threading.Thread(
        target=_reload_on_hup,
        args=(str(hostname), _send_reload),
        name="heimdall-sighup",
        daemon=True,
    )
    _hup_listener.append(listener)
    listener.start()
    log.info("SIGHUP reloads the served models (pid %d)", os.getpid())


def _on_sighup(signum: int, frame: Any) -> None:
    _hup.set()


def _send_reload(hostname: str) -> list[Any]:
    from tasks import app

    return app.control.broadcast(
        contract.RELOAD_COMMAND, destination=[hostname], reply=True, timeout=180, limit=1
    )


def _reload_on_hup(hostname: str, send: Callable[[str], list[Any]]) -> None:
    """Runs in a thread of the main process: one reload per SIGHUP (several at once: one)."""
    while True:
        _hup.wait()
        _hup.clear()
        log.info("SIGHUP: reloading the served models")
        try:
            replies = send(hostname)
        except Exception as exc:
            log.error("SIGHUP: cannot ask this worker to reload: %s", exc)
            continue
        for reply in replies or []:
            body = reply.get(hostname) if isinstance(reply, dict) else None
            if isinstance(body, dict):
                outcome = "done" if body.get("ok") else f"refused: {body.get('error')}"
                log.info("SIGHUP: reload %s", outcome)
