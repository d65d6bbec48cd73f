"""Remote control commands of the worker (``app.control.broadcast(name, ...)``).

Control commands run in the worker's MAIN process, not in the pool children
that hold the onnxruntime sessions. So status is read from what the children
recorded in Redis, and a reload re-resolves the model in the main process and
restarts the pool: the new children fork from it and load the new model in
``worker_process_init``. In-flight tasks finish on the old model first.
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
from heimdall.errors import ModelUnavailable
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


def smoke_check(resolved: ResolvedModel) -> None:
    """Load ``resolved`` and answer one request in a subprocess; ModelUnavailable if it cannot.

    Not in this process: it forks the pool children, and an onnxruntime session
    must not exist before a fork.
    """
    command = [
        sys.executable,
        "-m",
        "heimdall.smoke",
        str(resolved.onnx_path),
        str(resolved.onnx_path.parent / CARD_FILENAME),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ModelUnavailable(
            f"version {resolved.identity.version} did not answer a test request within "
            f"{SMOKE_TIMEOUT_S:g} s; refused"
        ) from exc
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ModelUnavailable(
            f"version {resolved.identity.version} cannot serve ({reason}); refused"
        )


@inspect_command(name=contract.MODEL_STATUS_COMMAND)
def heimdall_model_status(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Model of this worker and the load state of each pool child.

    Reply: ``{"hostname", "model": identity|None, "error": str|None,
    "children": [{"pid", "state": "loaded"|"failed"|"starting", "model", "error", "at"}]}``.
    """
    return model.status(state.hostname, _pool_pids(state))


@control_command(name=contract.RELOAD_COMMAND, args=[("alias", str)], signature="[alias]")
def heimdall_reload_model(state: Any, alias: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Re-resolve ``name@alias`` (default: the configured alias) and restart the pool on it.

    The candidate is resolved, its card checked, and it must load and answer a
    test request (:func:`smoke_check`) before the pool restarts on it.
    Reply: ``{"ok": bool, "hostname", "model": identity in force, "error": str|None}``.
    On error nothing changes: the current model keeps serving.
    """
    settings = get_settings()
    hostname = state.hostname
    if not state.app.conf.worker_pool_restarts:
        return {
            "ok": False,
            "hostname": hostname,
            "model": model.main_identity(),
            "error": "worker_pool_restarts is disabled; cannot swap the model",
        }
    try:
        resolved = registry.resolve(settings, alias)
        smoke_check(resolved)
    except Exception as exc:
        model.refuse(exc)
        log.error(
            "reload of %s@%s failed, the current model keeps serving: %s",
            settings.model_name,
            alias or settings.model_alias,
            model.main_error(),
            exc_info=not isinstance(exc, ModelUnavailable),
        )
        return {
            "ok": False,
            "hostname": hostname,
            "model": model.main_identity(),
            "error": model.main_error(),
        }
    model.adopt(resolved)
    log.info("reloading pool children on %s", registry.dumps(registry.model_summary(resolved)))
    _restart_pool(state)
    return {"ok": True, "hostname": hostname, "model": resolved.identity.to_dict(), "error": None}
