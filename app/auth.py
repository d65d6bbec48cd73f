"""Bearer-token guard of the state-changing endpoints (traffic, reload, promote, truth).

The token is ``settings.admin_token`` (``HEIMDALL_ADMIN_TOKEN``), compared in
constant time. With no token configured the endpoints answer 403 and say how
to set one, so an unconfigured deployment is closed, not open. Read-only
endpoints never call :func:`require_admin`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from flask import Flask, Response, g, request

from app.errors import problem_response
from app.services import services
from heimdall.errors import HeimdallError

REALM = 'Bearer realm="heimdall-admin"'

F = TypeVar("F", bound=Callable[..., Response])


class AdminDisabled(HeimdallError):
    """No admin token is configured, so no state-changing call is accepted."""

    status = 403
    type = "admin-disabled"
    title = "Admin endpoints disabled"


class AdminUnauthorized(HeimdallError):
    """The request carries no admin token, or the wrong one."""

    status = 401
    type = "unauthorized"
    title = "Admin token required"


def require_admin() -> None:
    """Raise unless the request carries ``Authorization: Bearer <admin token>``."""
    configured = services().settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise AdminDisabled(
            "state-changing endpoints are disabled: set HEIMDALL_ADMIN_TOKEN on the API "
            "and send it as 'Authorization: Bearer <token>'"
        )
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    expected = configured.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
        raise AdminUnauthorized(
            "send the admin token as 'Authorization: Bearer <token>'"
            if not header
            else "the admin token is not valid"
        )
    g.log_fields["admin"] = True


def admin(view: F) -> F:
    """Decorate a view so it runs only for a valid admin token."""

    @wraps(view)
    def guarded(*args: object, **kwargs: object) -> Response:
        require_admin()
        return view(*args, **kwargs)

    return guarded  # type: ignore[return-value]


def _on_unauthorized(exc: AdminUnauthorized) -> Response:
    problem = exc.to_problem()
    g.problem = problem
    return problem_response(problem, {"WWW-Authenticate": REALM})


def register_auth(app: Flask) -> None:
    """Render 401s with their ``WWW-Authenticate`` challenge."""
    app.register_error_handler(AdminUnauthorized, _on_unauthorized)
