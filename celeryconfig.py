"""Celery's configuration, one function of the settings for every process that uses Celery.

:func:`celery_config` is what the worker (``tasks``), the API's client
(``app/dispatch.py``), the ``heimdall`` command and the tests all load; each
process then adds its side's options (:func:`worker_options`,
:func:`client_options`) and nothing else. :func:`make_app` does the three steps.
Every value an operator may want to change comes from
:class:`heimdall.config.Settings`; the rest is policy, and each non-obvious line
says why it is set. Each task's policy is declared once, per task name, in
:func:`task_policy`.

``app.config_from_object("celeryconfig")`` still works (e.g. a client
configured by module): the module's attributes are the shared configuration
from :func:`heimdall.config.get_settings`, read when Celery asks for them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from heimdall import contract
from heimdall.config import Settings, get_settings

SERIALIZER = "json"
"""JSON only: task messages and results cross process (and trust) boundaries, and
pickle would let whoever can write to Redis run code in the workers."""


def task_policy(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each task's policy by task name, applied to the task by Celery (``task_annotations``).

    The prediction tasks are pure functions of their arguments, so running one
    twice is harmless and losing one is not: ``acks_late`` (a worker that dies
    mid-task leaves the message to be delivered again) and
    ``reject_on_worker_lost`` (a killed pool child requeues it at once instead
    of recording a failure; the task base class bounds how often, see
    tasks/predict.py). One prediction (or one batch chunk) runs in
    milliseconds: a task that runs for ``task_time_limit_s`` is stuck (e.g. a
    wedged native call) and its child is replaced; the soft limit fires first
    so the task can still answer a 503 problem. Results are stored where the
    API reads them (sync wait, job poll, chord), not for shadow copies.
    """
    prediction = {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "time_limit": settings.task_time_limit_s,
        "soft_time_limit": max(1.0, 0.8 * settings.task_time_limit_s),
        "serializer": SERIALIZER,
        "ignore_result": False,
    }
    return {
        contract.PREDICT_TASK: prediction,
        contract.CHUNK_TASK: prediction,
        contract.COLLECT_TASK: prediction,
        contract.SHADOW_TASK: {**prediction, "ignore_result": True},
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration every process shares, from ``settings``."""
    return {
        "broker_url": settings.broker_url,
        # Celery lets CELERY_BROKER_URL in the environment win over broker_url but
        # not over these: the settings a process was given must win (they come
        # from the same variables in production, not always in tests).
        "broker_read_url": settings.broker_url,
        "broker_write_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_serializer": SERIALIZER,
        "result_serializer": SERIALIZER,
        "accept_content": [SERIALIZER],
        "result_accept_content": [SERIALIZER],
        "task_annotations": task_policy(settings),
        # Job results are polled by clients through GET /api/v1/jobs/<id>; keep
        # them as long as the API promises (the API shortens the ones it answered).
        "result_expires": settings.result_expires_s,
        # With acks_late, each child reserves at most one extra message: a slow
        # task cannot hold a queue of work hostage while other workers sit idle.
        "worker_prefetch_multiplier": 1,
        # Jobs report "running" (STARTED) to pollers instead of staying "queued".
        "task_track_started": True,
        # heimdall_reload_model swaps the model by restarting the pool: new
        # children fork from the main process (which holds the new resolved
        # model) and build their onnxruntime session in worker_process_init.
        "worker_pool_restarts": True,
        # Flower (and any events consumer) needs task events, including "sent".
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # Keep retrying the broker at start-up (Redis may start after the worker
        # in compose/k8s) instead of exiting; silences Celery 6's deprecation warning.
        "broker_connection_retry_on_startup": True,
        # A prediction takes milliseconds: when the broker connection drops, let
        # the running ones finish and store their results for the clients waiting
        # on them (the unacked message is redelivered later and recomputed
        # harmlessly) rather than killing them (Celery 6 default).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # The API publishes while a client waits: retry a failed publish
        # briefly, then give up fast so /predict can answer 503 instead of hanging.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0.0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "broker_transport_options": {
            # With acks_late, Redis hands an unacknowledged message to another
            # worker after this long (e.g. when a worker's main process was
            # SIGKILLed). It must exceed the longest a reserved message can wait
            # plus run (prefetch 1: two time limits), else healthy jobs would be
            # duplicated; the 1 h default would leave a crashed worker's jobs
            # stuck for an hour.
            "visibility_timeout": settings.visibility_timeout_s,
            # ...and look for such messages every 5 s. kombu's default sweeps
            # every 10 s x a throttle of 10, which added up to 100 s to every
            # redelivery.
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # Fail fast when Redis is down instead of blocking the API's request thread.
            "socket_connect_timeout": 2.0,
        },
        # The same for the result backend connection.
        "redis_socket_connect_timeout": 2.0,
        # Each child imports onnxruntime and builds its session in
        # worker_process_init before it reports up; the 4 s default can kill
        # children on a busy host.
        "worker_proc_alive_timeout": 30.0,
        # Celery must not remove the handlers the service (or gunicorn, or
        # pytest) installed on the root logger; it only adds its own.
        "worker_hijack_root_logger": False,
    }


def worker_options() -> dict[str, Any]:
    """What only the worker adds to :func:`celery_config`.

    A result that cannot be stored because Redis blipped is retried until Redis
    is back, rather than failing the task and acknowledging its message. (A
    client must answer 503 fast instead: :func:`client_options`.)
    """
    return {
        "result_backend_always_retry": True,
        "result_backend_max_retries": 120,
        "result_backend_max_sleep_between_retries_ms": 2_000,
    }


BACKEND_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
"""Reconnects to the result backend while a client waits. Celery's default (20 retries,
1 s apart) would hold a request ~20 s when Redis is down; the API answers 503 instead."""


def client_options() -> dict[str, Any]:
    """What a process that publishes while someone waits (the API, the CLI) adds."""
    return {"result_backend_transport_options": {"retry_policy": dict(BACKEND_RETRY_POLICY)}}


def make_app(main: str, settings: Settings, *, worker: bool = False) -> Celery:
    """A Celery app named ``main`` configured from ``settings``, as a worker or as a client.

    The result backend is bound explicitly: Celery would let
    ``CELERY_RESULT_BACKEND`` in the environment win over the settings.
    """
    app = Celery(main, set_as_current=worker)
    app.backend_cls = settings.result_backend
    side = worker_options() if worker else client_options()
    app.conf.update({**celery_config(settings), **side})
    return app


def __getattr__(name: str) -> Any:
    """``config_from_object("celeryconfig")``: the shared configuration, by setting name.

    Read from :func:`heimdall.config.get_settings` when Celery asks, not at
    import, so a process that changes its settings first is configured by them.
    """
    try:
        return celery_config(get_settings())[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *celery_config(get_settings())})
