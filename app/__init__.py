"""The HTTP front of Heimdall: the Flask application factory.

The API validates and hashes requests, answers from the prediction cache, and
hands everything else to the Celery workers by task name. It never loads the
model for inference (no onnxruntime here): it only reads the served model's
card from the registry to validate requests and key the cache.
"""

from __future__ import annotations

from flask import Flask

from app import api, health, openapi
from app.errors import register_error_handlers
from app.logs import configure_logging, install_request_hooks
from app.metrics import init_metrics
from app.services import EXTENSION, Services
from heimdall.config import Settings, get_settings


def create_app(config: Settings | None = None) -> Flask:
    """Build the API for ``config`` (default: settings from the environment)."""
    settings = config if config is not None else get_settings()
    configure_logging(settings.log_level, settings.log_format)

    app = Flask(__name__)
    # Werkzeug answers 413 on its own once a body passes this many bytes.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes

    _, counters = init_metrics(app)
    app.extensions[EXTENSION] = Services.build(settings, counters)

    register_error_handlers(app)
    install_request_hooks(
        app, lambda problem_type: counters.prediction_errors.labels(type=problem_type).inc()
    )
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    return app
