"""Task log lines you can follow from the API to the worker and back.

Every task run logs a ``task.start`` and a ``task.done`` line carrying the
task id and the client's ``request_id``, so one grep for a request id finds
the API line, the task lines and the task's outcome; any other line a
``heimdall.*`` logger writes during the task gets the same two ids.

Logging is set up here, not by Celery: a ``setup_logging`` receiver makes
Celery leave the root logger alone (no hijack) and this module gives the
``heimdall`` and ``celery`` logger trees one stderr handler with the service's
format (``HEIMDALL_LOG_FORMAT``: logfmt or json, heimdall/logformat.py), the
same lines as the API's.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from celery import signals

from heimdall.config import get_settings
from heimdall.logformat import make_formatter
from tasks.jobs import summarize

log = logging.getLogger("heimdall.tasks")

_started: dict[str, float] = {}
"""task id -> perf_counter at task_prerun, in this process."""

_task_ids: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "heimdall_task_ids", default=None
)
"""``task_id`` and ``request_id`` of the task this process is running."""

LOGGER_TREES = ("heimdall", "celery")


class TaskContextFilter(logging.Filter):
    """Add the running task's ``task_id``/``request_id`` to records that lack them."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Never drops a record; only adds fields."""
        for key, value in (_task_ids.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_worker_logging(level: str, celery_level: int | str, log_format: str) -> None:
    """One stderr handler with the service's format on the ``heimdall`` and ``celery`` trees."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(TaskContextFilter())
    for name, tree_level in zip(LOGGER_TREES, (level, celery_level), strict=True):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(tree_level)
        logger.propagate = False  # the root logger stays the host's


@signals.setup_logging.connect
def _on_setup_logging(loglevel: Any = None, **kwargs: Any) -> None:
    """Replace Celery's logging set-up (which would take over the root logger)."""
    settings = get_settings()
    configure_worker_logging(settings.log_level, loglevel or logging.INFO, settings.log_format)


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
    request_id = request_id_of(task, args)
    _task_ids.set({"task_id": task_id or "", "request_id": request_id or ""})
    log.info(
        "task.start",
        extra={
            "task": getattr(task, "name", None),
            "task_id": task_id,
            "request_id": request_id,
            "items": _items(args),
            "pid": os.getpid(),
        },
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
        "task.done",
        extra={
            "task": getattr(task, "name", None),
            "task_id": task_id,
            "request_id": request_id_of(task, args),
            "state": state,
            "outcome": summarize(retval) if state == "SUCCESS" else None,
            "runtime_ms": None if runtime_ms is None else round(runtime_ms, 3),
            "pid": os.getpid(),
        },
    )
    _task_ids.set(None)
