"""Structured log lines of the API and the worker: one event per line.

Two renderings of the same fields (``HEIMDALL_LOG_FORMAT``): ``logfmt``
(``key=value`` pairs, the default) and ``json`` (one object a line, for a log
shipper). Only named logger trees are configured (``heimdall``, and
``celery`` in the worker); the root logger is left to whoever runs the process
(gunicorn, pytest). The worker uses the same formatters (tasks/logs.py).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Callable

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from heimdall.logformat import make_formatter


def configure_logging(level: str, log_format: str = "logfmt") -> None:
    """Give the ``heimdall`` loggers a level and, when nothing else logs, a stderr handler.

    Under pytest (or any host that configured the root logger) records simply
    propagate; under gunicorn, whose root logger has no handler, they would be
    lost below WARNING without one of our own.
    """
    logger = logging.getLogger("heimdall")
    logger.setLevel(level)
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    logger.addHandler(handler)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PREDICT_ENDPOINTS = frozenset(
    {"api.predict", "api.predict_async", "api.predict_batch", "api.predict_batch_async"}
)
access_log = logging.getLogger("heimdall.api.access")


def install_request_hooks(app: Flask, on_prediction_problem: Callable[[str], None]) -> None:
    """Request id, timing and one structured log line per request.

    The request id is the client's ``X-Request-ID`` when it looks like an id
    (so it can be followed across systems), a fresh uuid4 hex otherwise; it is
    echoed in the response header and handed to the workers in the job.
    ``on_prediction_problem`` is told the problem type of every failed
    prediction request (for the error counter).
    """

    @app.before_request
    def _start() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.log_fields = {}

    @app.after_request
    def _finish(response: Response) -> Response:
        _drain_body()
        request_id = g.get("request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
        problem = g.get("problem")
        if problem is not None and request.endpoint in _PREDICT_ENDPOINTS:
            on_prediction_problem(str(problem.get("type", "")).rsplit(":", 1)[-1])
        if request.endpoint != "prometheus_metrics":
            duration_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
            fields = {
                "request_id": request_id,
                "method": request.method,
                "route": request.url_rule.rule if request.url_rule else request.path,
                "status": response.status_code,
                "duration_ms": round(duration_ms, 2),
                **g.get("log_fields", {}),
            }
            if problem is not None:
                fields["problem_type"] = str(problem.get("type", "")).rsplit(":", 1)[-1]
            access_log.info("request", extra=fields)
        return response


def _drain_body() -> None:
    """Read what is left of the request body (a request rejected before its body was read).

    gunicorn's gthread worker then sometimes closes the keep-alive connection
    after the response, and a client reusing it gets "connection reset" on its
    next request. Bounded by MAX_CONTENT_LENGTH (werkzeug refuses to read more).
    """
    try:
        stream = request.stream
        while stream.read(1 << 16):
            pass
    except (HTTPException, OSError, ValueError):
        pass  # over the size limit or a broken client: the server closes the connection
