"""Task log lines you can follow from the API to the worker and back.

Every task run logs a ``task.start`` and a ``task.done`` line in logfmt
(``key=value``) carrying the task id and the client's ``request_id``, so one
grep for a request id finds the API line, the task lines and the task's
outcome. Handlers are Celery's (root logger, not hijacked).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from celery import signals

from heimdall.config import get_settings
from tasks.jobs import summarize

log = logging.getLogger("heimdall.tasks")

_started: dict[str, float] = {}
"""task id -> perf_counter at task_prerun, in this process."""


def logfmt(event: str, **fields: Any) -> str:
    """``event key=value ...``; values with spaces or quotes are quoted."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def request_id_of(task: Any, args: Any) -> str | None:
    """The client request id of a task run.

    Taken from a ``request_id`` message header when the sender set one, else
    from the job(s) or batch meta in the arguments.
    """
    header = getattr(getattr(task, "request", None), "request_id", None)
    if isinstance(header, str):
        return header
    ids: list[str] = []
    for arg in args or ():
        candidates = arg if isinstance(arg, list) else [arg]
        for item in candidates:
            rid = item.get("request_id") if isinstance(item, Mapping) else None
            if isinstance(rid, str) and rid not in ids:
                ids.append(rid)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ",".join(ids[:4]) + ("..." if len(ids) > 4 else "")


def _items(args: Any) -> int | None:
    if args and isinstance(args[0], list):
        return len(args[0])
    return None


@signals.task_prerun.connect
def _on_prerun(
    task_id: str | None = None, task: Any = None, args: Any = None, **kwargs: Any
) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()
    log.info(
        logfmt(
            "task.start",
            task=getattr(task, "name", None),
            task_id=task_id,
            request_id=request_id_of(task, args),
            items=_items(args),
            pid=os.getpid(),
        )
    )


@signals.task_postrun.connect
def _on_postrun(
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **kwargs: Any,
) -> None:
    started = _started.pop(task_id, None) if task_id else None
    runtime_ms = (time.perf_counter() - started) * 1000.0 if started is not None else None
    log.info(
        logfmt(
            "task.done",
            task=getattr(task, "name", None),
            task_id=task_id,
            request_id=request_id_of(task, args),
            state=state,
            outcome=summarize(retval) if state == "SUCCESS" else None,
            runtime_ms=runtime_ms,
            pid=os.getpid(),
        )
    )


@signals.after_setup_logger.connect
def _on_setup_logger(**kwargs: Any) -> None:
    """Apply HEIMDALL_LOG_LEVEL to the service's own loggers."""
    logging.getLogger("heimdall").setLevel(get_settings().log_level)
