"""One problem-document handler for every error the API answers with.

Domain errors (:class:`heimdall.errors.HeimdallError`) carry their own status;
werkzeug's HTTP errors (404, 405, 413 from ``MAX_CONTENT_LENGTH``, ...) are
rendered in the same shape; anything else is a logged 500 that tells the
client nothing about the internals.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, g, json, request
from werkzeug.exceptions import HTTPException

from heimdall.errors import HeimdallError, bounded_problem

log = logging.getLogger("heimdall.api")

PROBLEM_MIMETYPE = "application/problem+json"
_PROBLEM_PREFIX = "urn:heimdall:problem:"


class WorkerFailure(HeimdallError):
    """A prediction task died with an unexpected exception (not the client's fault)."""

    status = 500
    type = "worker-error"
    title = "Prediction failed"


class RemoteProblem(HeimdallError):
    """A problem document produced elsewhere (a worker), re-raised in the API."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail", "")), field=problem.get("field"))
        self.problem = bounded_problem(problem)
        self.status = int(problem.get("status", 500))

    def to_problem(self) -> dict[str, Any]:
        """The worker's problem document as it was sent."""
        return dict(self.problem)


def problem_type_slug(problem: dict[str, Any]) -> str:
    """The short type of a problem (``invalid-iq``), for metrics and logs."""
    return str(problem.get("type", "about:blank")).removeprefix(_PROBLEM_PREFIX)


def problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A response carrying ``problem`` as ``application/problem+json``."""
    body = dict(problem)
    request_id = g.get("request_id")
    if request_id is not None:
        body.setdefault("request_id", request_id)
    response = current_app.response_class(
        json.dumps(body), status=int(body["status"]), mimetype=PROBLEM_MIMETYPE
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def http_problem(exc: HTTPException) -> dict[str, Any]:
    """A werkzeug HTTP error as a problem document."""
    status = exc.code or 500
    slug = (exc.name or "error").lower().replace(" ", "-")
    detail = exc.description or exc.name or "HTTP error"
    if status == 413:
        limit = request.max_content_length
        detail = f"request body is larger than the {limit} bytes this service accepts here"
        slug = "payload-too-large"
    elif status == 404:
        detail = f"no resource at {request.path}"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.path}"
    # The path and method are the client's: bounded like every quoted input.
    return bounded_problem(
        {
            "type": f"{_PROBLEM_PREFIX}{slug}",
            "title": exc.name or "HTTP error",
            "status": status,
            "detail": detail,
        }
    )


def server_problem_response(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response carrying a problem document, for errors the server answers.

    gunicorn answers a request it cannot parse (bad request line, headers too
    large, unsupported transfer coding) before the app sees it, with an HTML
    page of its own; deploy/gunicorn.conf.py has it write this instead, so a
    client gets the same ``application/problem+json`` from every layer.
    """
    slug = (reason or "error").lower().replace(" ", "-")
    problem = bounded_problem(
        {
            "type": f"{_PROBLEM_PREFIX}{slug}",
            "title": reason or "Error",
            "status": status,
            "detail": detail or reason or "the server could not handle this request",
        }
    )
    body = json.dumps(problem).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_MIMETYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _on_heimdall_error(exc: HeimdallError) -> Response:
    problem = exc.to_problem()
    g.problem = problem
    if exc.status >= 500:
        log.warning(
            "problem", extra={"problem_type": problem_type_slug(problem), "detail": exc.detail}
        )
    return problem_response(problem)


def _on_http_exception(exc: HTTPException) -> Response:
    problem = http_problem(exc)
    g.problem = problem
    headers: dict[str, str] = {}
    valid_methods = getattr(exc, "valid_methods", None)
    if valid_methods:
        headers["Allow"] = ", ".join(valid_methods)
    return problem_response(problem, headers)


def _on_unexpected(exc: Exception) -> Response:
    log.exception(
        "unhandled exception",
        extra={"request_id": g.get("request_id"), "route": request.path},
    )
    problem = {
        "type": f"{_PROBLEM_PREFIX}internal-error",
        "title": "Internal error",
        "status": 500,
        "detail": "the server failed to handle this request; it has been logged",
    }
    g.problem = problem
    return problem_response(problem)


def register_error_handlers(app: Flask) -> None:
    """Install the problem handlers on ``app``."""
    app.register_error_handler(HeimdallError, _on_heimdall_error)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(Exception, _on_unexpected)
