"""The Celery worker of Heimdall: ``celery -A tasks worker --pool=prefork``.

The app is built by ``celeryconfig.make_app`` from the settings (the
configuration every process shares, plus the worker's options); importing the
modules below registers the tasks (``heimdall.predict``, ``heimdall.predict_chunk``,
``heimdall.collect_batch``), the worker signal handlers that load the model per
pool child, the task log lines, the ``heimdall_*`` control commands and the
worker's broker transport. The API never imports this package: it sends tasks
by name.
"""

import os

from celeryconfig import make_app
from heimdall.config import get_settings

# A remote MLflow registry that is down must not hold the worker's start for
# minutes of HTTP retries: it then serves its last verified model (tasks/model.py).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

settings = get_settings()
"""The settings this worker's app was configured with (at import)."""
app = make_app("heimdall", settings, worker=True)

# Imported for their registrations (tasks, signal handlers, control commands);
# they need `app` above, hence after it.
from tasks import control, logs, metrics, model, pool, predict, transport  # noqa: E402

__all__ = ["app", "control", "logs", "metrics", "model", "pool", "predict", "settings", "transport"]
