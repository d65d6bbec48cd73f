"""Remote control commands of the worker (``app.control.broadcast(name, ...)``).

Control commands run in the worker's MAIN process, not in the pool children
that hold the onnxruntime sessions. So status is read from what the children
recorded in Redis, and a reload re-resolves the served versions (champion and
extra models) in the main process, smoke-checks each candidate in a
subprocess, and restarts the pool: the new children fork from it and load the
new set in ``worker_process_init``. In-flight tasks finish on the old models
first.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

from celery.worker.control import control_command, inspect_command

from heimdall import contract, registry
from heimdall.config import get_settings
from heimdall.errors import HeimdallError, ModelUnavailable
from heimdall.modelcard import CARD_FILENAME
from heimdall.registry import ResolvedModel
from tasks import model

SMOKE_TIMEOUT_S = 120.0
"""Longest a candidate model may take to load and answer one request, seconds."""

log = logging.getLogger("heimdall.worker")


def _pool_pids(state: Any) -> list[int]:
    """Pids of the pool's live children (the main process's own pid for solo)."""
    info = state.consumer.pool.info or {}
    pids = info.get("processes")
    if pids is None:
        return [os.getpid()]
    return [int(p) for p in pids]


def _restart_pool(state: Any) -> None:
    """Replace every pool child; busy ones after their current task.

    Celery's own pool_restart path (no module reloads) flags every child to exit
    before its next job, but an idle prefork child sits blocked on its job pipe
    and would only notice with its next job, which it would still run on the
    old model. So idle children are also shrunk away (a controlled termination,
    no "lost worker" noise) and the pool grown back by as many: the pool forks
    their replacements from this process at once.
    """
    state.consumer.controller.reload(modules=[])
    pool = state.consumer.pool
    inner = getattr(pool, "_pool", None)  # billiard's pool (prefork only)
    if inner is None or not hasattr(inner, "_iterinactive"):
        return
    idle = sum(1 for _ in inner._iterinactive())
    if idle:
        pool.shrink(idle)
        pool.grow(idle)


def smoke_check(candidates: dict[str, ResolvedModel]) -> dict[str, str]:
    """Load each candidate and answer the known input in one subprocess: target -> why refused.

    Not in this process: it forks the pool children, and an onnxruntime session
    must not exist before a fork. Each model must answer the card's recorded
    known input within its tolerance (:mod:`heimdall.smoke`).
    """
    if not candidates:
        return {}
    command = [sys.executable, "-m", "heimdall.smoke"]
    for resolved in candidates.values():
        command += [str(resolved.onnx_path), str(resolved.onnx_path.parent / CARD_FILENAME)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {
            target: f"version {resolved.identity.version} did not answer a test request "
            f"within {SMOKE_TIMEOUT_S:g} s; refused"
            for target, resolved in candidates.items()
        }
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ok", "refused"))]
    refused: dict[str, str] = {}
    for i, (target, resolved) in enumerate(candidates.items()):
        line = lines[i] if i < len(lines) else None
        if line is not None and line.startswith("ok"):
            continue
        reason = (
            line.removeprefix("refused: ")
            if line is not None
            else ((done.stderr.strip().splitlines() or ["no reason given"])[-1])
        )
        refused[target] = f"version {resolved.identity.version} cannot serve ({reason}); refused"
    return refused


@inspect_command(name=contract.MODEL_STATUS_COMMAND)
def heimdall_model_status(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Models of this worker and the load state of each pool child.

    Reply: ``{"hostname", "model": champion identity|None, "models": [identity, ...],
    "errors": {target: why not held}, "error": str|None, "children": [{"pid",
    "state": "loaded"|"failed"|"starting", "model", "models", "errors", "error", "at"}]}``.
    """
    return model.status(state.hostname, _pool_pids(state))


@control_command(name=contract.RELOAD_COMMAND, args=[("alias", str)], signature="[alias]")
def heimdall_reload_model(state: Any, alias: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Re-resolve the champion (``alias``, default: the configured one) and the extra models.

    Every candidate is downloaded, its card checked against its ONNX file and
    it must answer the known input like its card says (:func:`smoke_check`)
    before the pool restarts on the new set. A champion refused: nothing
    changes. An extra version refused: it keeps its previous version (or
    stays absent), the others move on. An extra target the registry does not
    know is skipped (not served, not an error).

    Reply: ``{"ok": bool, "hostname", "model": champion identity in force,
    "models": [identity in force, ...], "error": str|None, "errors": {target:
    why refused}}``; ``ok`` only when nothing was refused.
    """
    settings = get_settings()
    hostname = state.hostname
    champion_target = alias or settings.model_alias
    if not state.app.conf.worker_pool_restarts:
        return _reply(hostname, "worker_pool_restarts is disabled; cannot swap the model", {})
    try:
        identity = registry.resolve_version(settings, champion_target)
    except Exception as exc:
        return _refused(hostname, champion_target, exc)
    try:
        champion = registry.resolve(settings, champion_target)
    except Exception as exc:
        why = exc.detail if isinstance(exc, HeimdallError) else f"{type(exc).__name__}: {exc}"
        refusal = ModelUnavailable(f"version {identity.version} refused: {why}")
        return _refused(hostname, champion_target, refusal)
    extras, skipped, refused = model.resolve_extras(settings, champion_target)
    refused.update(smoke_check({champion_target: champion, **extras}))
    if champion_target in refused:
        return _refused(hostname, champion_target, ModelUnavailable(refused[champion_target]))
    kept = model.main_extras()
    served = {t: r for t, r in extras.items() if t not in refused}
    served.update({t: kept[t] for t in refused if t in kept})
    for target, why in refused.items():
        log.error("reload: extra model %s refused, it keeps its previous state: %s", target, why)
    for target, why in skipped.items():
        log.warning("reload: extra model %s not served: %s", target, why)
    model.adopt(champion)
    model.adopt_extras(served, {**skipped, **{t: w for t, w in refused.items() if t not in kept}})
    log.info(
        "reloading pool children on %s",
        registry.dumps([registry.model_summary(r) for r in [champion, *served.values()]]),
    )
    _restart_pool(state)
    error = f"refused: {', '.join(sorted(refused))}" if refused else None
    return _reply(hostname, error, refused)


def _refused(hostname: str, target: str, exc: BaseException) -> dict[str, Any]:
    """Reply of a reload whose champion was refused: nothing changed."""
    settings = get_settings()
    model.refuse(exc)
    log.error(
        "reload of %s@%s failed, the current models keep serving: %s",
        settings.model_name,
        target,
        model.main_error(),
        exc_info=not isinstance(exc, HeimdallError),
    )
    error = model.main_error() or "refused"
    return {
        "ok": False,
        "hostname": hostname,
        "model": model.main_identity(),
        "models": model.main_models(),
        "error": error,
        "errors": {target: error},
    }


def _reply(hostname: str, error: str | None, errors: dict[str, str]) -> dict[str, Any]:
    return {
        "ok": error is None,
        "hostname": hostname,
        "model": model.main_identity(),
        "models": model.main_models(),
        "error": error,
        "errors": errors,
    }
