"""Celery settings shared by the worker (``tasks``) and the API's client app.

Loaded with ``app.config_from_object("celeryconfig")``. Every value that an
operator may want to change comes from :func:`heimdall.config.get_settings`;
the rest is policy, and each non-obvious line says why it is set.
"""

from __future__ import annotations

from heimdall.config import get_settings

_settings = get_settings()

broker_url = _settings.broker_url
result_backend = _settings.result_backend

# JSON only: task messages and results cross process (and trust) boundaries,
# and pickle would let whoever can write to Redis run code in the workers.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Job results are polled by clients through GET /api/v1/jobs/<id>; keep them as
# long as the API promises (the API shortens the ones it already answered).
result_expires = _settings.result_expires_s

# A prediction is a pure function of its payload, so running it twice is
# harmless: acknowledge only once it is done, so a worker that dies mid-task
# leaves the message to be delivered again instead of losing the job.
task_acks_late = True
# ...and when the pool child running it is killed (OOM, segfault in a native
# library), requeue the message at once instead of recording a failure. A
# message that kills every child it reaches is not requeued forever: the task
# base class counts starts and fails it after max_task_attempts (tasks/predict.py).
task_reject_on_worker_lost = True
# With acks_late, each child reserves at most one extra message: a slow task
# cannot hold a queue of work hostage while other workers sit idle.
worker_prefetch_multiplier = 1

# One prediction (or one batch chunk) runs in milliseconds; a task that runs
# for this long is stuck (e.g. a wedged native call) and its child is replaced.
task_time_limit = _settings.task_time_limit_s
# The soft limit fires first so the task can still answer a 503 problem.
task_soft_time_limit = max(1.0, 0.8 * _settings.task_time_limit_s)

# Jobs report "running" (STARTED) to pollers instead of staying "queued".
task_track_started = True

# heimdall_reload_model swaps the model by restarting the pool: new children
# fork from the main process (which holds the new resolved model) and build
# their onnxruntime session in worker_process_init.
worker_pool_restarts = True

# Flower (and any events consumer) needs task events, including "sent".
worker_send_task_events = True
task_send_sent_event = True

# Keep retrying the broker at start-up (Redis may start after the worker in
# compose/k8s) instead of exiting; silences Celery 6's deprecation warning.
broker_connection_retry_on_startup = True
# A prediction takes milliseconds: when the broker connection drops, let the
# running ones finish and store their results for the clients waiting on them
# (the unacked message is redelivered later and recomputed harmlessly) rather
# than killing them (Celery 6 default).
worker_cancel_long_running_tasks_on_connection_loss = False

# The API publishes while a client waits: retry a failed publish briefly, then
# give up fast so /predict can answer 503 instead of hanging.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 3,
    "interval_start": 0.0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}

broker_transport_options = {
    # With acks_late, Redis hands an unacknowledged message to another worker
    # after this long (e.g. when a worker's main process was SIGKILLed). It
    # must exceed the longest a reserved message can wait plus run (prefetch 1:
    # two time limits), else healthy jobs would be duplicated; the 1 h default
    # would leave a crashed worker's jobs stuck for an hour.
    "visibility_timeout": _settings.visibility_timeout_s,
    # ...and look for such messages every 5 s. kombu's default sweeps every
    # 10 s x a throttle of 10, which added up to 100 s to every redelivery.
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    # Fail fast when Redis is down instead of blocking the API's request thread.
    "socket_connect_timeout": 2.0,
}
# The same for the result backend connection. (No result_backend_always_retry:
# the API shares this module and must answer 503 fast when Redis is down.)
redis_socket_connect_timeout = 2.0

# Each child imports onnxruntime and builds its session in worker_process_init
# before it reports up; the 4 s default can kill children on a busy host.
worker_proc_alive_timeout = 30.0

# Celery must not remove the handlers the service (or gunicorn, or pytest)
# installed on the root logger; it only adds its own.
worker_hijack_root_logger = False
