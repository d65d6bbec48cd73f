"""The HTTP front of Heimdall: the Flask application factory.

The API validates and hashes requests, answers from the prediction cache, and
hands everything else to the Celery workers by task name. It never loads the
model for inference (no onnxruntime here): it only reads the served model's
card from the registry to validate requests and key the cache.
"""

from __future__ import annotations

from flask import Flask, Response

from app import api, health, model_api, openapi
from app.auth import register_auth
from app.errors import register_error_handlers
from app.jsonprovider import OrjsonProvider
from app.logs import configure_logging, install_request_hooks
from app.metrics import init_metrics
from app.services import EXTENSION, Services
from heimdall.config import Settings, get_settings

# Sent with every response. The API serves JSON and one self-contained HTML page
# (/docs, inline style, no script): nothing may frame it, sniff a JSON body into
# HTML, leak its URLs (job ids) in a Referer, or keep a prediction in a shared cache.
SECURITY_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _add_security_headers(response: Response) -> Response:
    """Add :data:`SECURITY_HEADERS`, keeping any a view chose itself."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def create_app(config: Settings | None = None) -> Flask:
    """Build the API for ``config`` (default: settings from the environment)."""
    settings = config if config is not None else get_settings()
    configure_logging(settings.log_level, settings.log_format)

    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    # Werkzeug answers 413 on its own once a body passes this many bytes.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes

    _, counters = init_metrics(app)
    app.extensions[EXTENSION] = Services.build(settings, counters)

    register_error_handlers(app)
    register_auth(app)
    install_request_hooks(
        app, lambda problem_type: counters.prediction_errors.labels(type=problem_type).inc()
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(model_api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    # Registered last so it runs on every response, problem documents included.
    app.after_request(_add_security_headers)
    return app
