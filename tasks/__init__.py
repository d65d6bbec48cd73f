"""The Celery worker of Heimdall: ``celery -A tasks worker --pool=prefork``.

The app is configured from ``celeryconfig``; importing the modules below
registers the tasks (``heimdall.predict``, ``heimdall.predict_chunk``,
``heimdall.collect_batch``), the worker signal handlers that load the model per
pool child, the task log lines, the ``heimdall_*`` control commands and the
worker's broker transport. The API never imports this package: it sends tasks
by name.
"""

from celery import Celery

app = Celery("heimdall")
app.config_from_object("celeryconfig")

# Imported for their registrations (tasks, signal handlers, control commands);
# they need `app` above, hence after it.
from tasks import control, logs, metrics, model, predict, transport  # noqa: E402

__all__ = ["app", "control", "logs", "metrics", "model", "predict", "transport"]
