"""The Celery worker of Heimdall: ``celery -A tasks worker --pool=prefork``.

The app is configured from ``celeryconfig``; importing the modules below
registers the tasks (``heimdall.predict``, ``heimdall.predict_chunk``,
``heimdall.collect_batch``), the worker signal handlers that load the model per
pool child, the task log lines, the ``heimdall_*`` control commands and the
worker's broker transport. The API never imports this package: it sends tasks
by name.
"""

import os

from celery import Celery

# A remote MLflow registry that is down must not hold the worker's start for
# minutes of HTTP retries: it then serves its last verified model (tasks/model.py).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

app = Celery("heimdall")
app.config_from_object("celeryconfig")
# Worker only (the API shares celeryconfig and must answer 503 fast instead):
# a result that cannot be stored because Redis blipped is retried until Redis
# is back, rather than failing the task and acknowledging its message.
app.conf.update(
    result_backend_always_retry=True,
    result_backend_max_retries=120,
    result_backend_max_sleep_between_retries_ms=2_000,
)

# Imported for their registrations (tasks, signal handlers, control commands);
# they need `app` above, hence after it.
from tasks import control, logs, metrics, model, pool, predict, transport  # noqa: E402

__all__ = ["app", "control", "logs", "metrics", "model", "pool", "predict", "transport"]
