"""gunicorn settings of the Heimdall API: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

Environment: ``HEIMDALL_API_BIND`` (default 0.0.0.0:8000), ``HEIMDALL_API_WORKERS``
(default 2), ``HEIMDALL_API_THREADS`` (default 256), ``PROMETHEUS_MULTIPROC_DIR``
(default var/prometheus), ``HEIMDALL_API_CONTROL_SOCKET`` (default var/run/gunicorn.ctl,
``off`` disables it), plus the service's own ``HEIMDALL_*`` settings.

Shutdown: SIGTERM first drains for ``HEIMDALL_DRAIN_S`` (``/ready`` answers 503
while every request is still answered), then gunicorn's own graceful stop runs
(listeners closed, requests in flight finished within ``graceful_timeout``).
The whole stop takes at most ``drain_s + graceful_timeout`` (5 + 15 s by
default): the grace periods of deploy/supervisord.conf, deploy/k8s/api.yaml and
docker-compose.yml are above that. A second SIGTERM skips the rest of the drain;
SIGINT/SIGQUIT stop at once, as in plain gunicorn.

Reload: SIGHUP (new code or config) starts the new workers next to the old
ones; the old ones keep serving until every new one has resolved its model
and is about to accept, then answer their remaining keep-alive clients with
``Connection: close`` for ``keepalive`` seconds and stop gracefully (see
:class:`Handover`). Plain gunicorn stops the old workers at once, which left
seconds without an answer while the new ones imported the app.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from heimdall.config import get_settings

_settings = get_settings()

# prometheus_client picks its multiprocess value class when it is first
# imported, so the directory must be in the environment before any worker
# imports the app (workers fork from this process and inherit it).
_metrics_dir = Path(
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", str((_settings.var_dir / "prometheus").resolve())
    )
)

bind = os.environ.get("HEIMDALL_API_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("HEIMDALL_API_WORKERS", "2"))
# Sync /predict blocks a thread while it waits for a worker (up to
# predict_timeout_s), and a slow client blocks one while it trickles its
# request. A waiting thread costs no CPU (threads start only when needed), so
# each process keeps several times what the specified load holds: with 8, 84
# of 100 connections waited in the listen backlog; with 64, 100 clients plus
# 20 slow ones left ~4 threads per process free and /health probes queued
# behind predictions (P50 0.15-0.74 s, half within 100 ms); with 256, every
# probe answered within 100 ms (P95 7-10 ms).
worker_class = "gthread"
threads = int(os.environ.get("HEIMDALL_API_THREADS", "256"))
# Above the longest wait a view does, so gunicorn never kills a healthy wait.
timeout = int(_settings.predict_timeout_s) + 30
# After the drain, a request in flight has this long to finish: its wait for a
# worker ends after predict_timeout_s with a 202 and a job URL at the latest.
graceful_timeout = int(_settings.predict_timeout_s) + 10
keepalive = 5

# gunicorn >= 25.1 opens a control socket (for gunicornc) at one per-user default
# path ($XDG_RUNTIME_DIR or ~/.gunicorn): every gunicorn of that user on the host
# would fight over it. Each instance gets its own under its var/ instead.
_control_socket = os.environ.get(
    "HEIMDALL_API_CONTROL_SOCKET", str((_settings.var_dir / "run" / "gunicorn.ctl").resolve())
)
if _control_socket.lower() in {"", "off", "none", "false", "0"}:
    control_socket_disable = True
else:
    control_socket = _control_socket
    control_socket_mode = 0o600
if Path("/dev/shm").is_dir():
    # Heartbeat files on tmpfs: a slow disk must not get workers killed.
    worker_tmp_dir = "/dev/shm"

accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
access_log_format = (
    'remote=%(h)s method=%(m)s path="%(U)s" query="%(q)s" status=%(s)s bytes=%(B)s '
    'duration_ms=%(M)s request_id=%({x-request-id}o)s agent="%(a)s"'
)


class Drain:
    """The draining flag of one gunicorn instance: set by the master, read by its workers.

    One byte of anonymous shared memory, mapped before any worker forks, so every
    worker (also one forked during the drain) sees the master's write at once,
    and nothing on disk that a killed instance could leave behind for the next.
    """

    def __init__(self) -> None:
        self._flag = mmap.mmap(-1, 1)

    def begin(self) -> None:
        """Mark the instance draining; it stays so until it exits."""
        self._flag[0] = 1

    def active(self) -> bool:
        """Whether the instance is draining."""
        return self._flag[0] == 1


class Handover:
    """Which workers are ready and which are retiring, shared by the master and its workers.

    One byte per worker age (gunicorn numbers its workers 1, 2, 3, ... as it
    spawns them), in anonymous shared memory mapped before any worker forks:
    a worker writes READY into its byte once it can answer, the master writes
    RETIRING into an old worker's byte when its replacements are ready.
    """

    SLOTS = 1 << 16
    READY, RETIRING = 1, 2

    def __init__(self) -> None:
        self._board = mmap.mmap(-1, self.SLOTS)

    def mark(self, age: int, state: int) -> None:
        """Record ``state`` for the worker of this age."""
        self._board[age % self.SLOTS] = state

    def state(self, age: int) -> int:
        """The state last recorded for the worker of this age (0: none)."""
        return self._board[age % self.SLOTS]


HANDOVER_TIMEOUT_S = 180.0
"""A SIGHUP whose new workers are not all ready after this long falls back to
gunicorn's own behaviour (the old workers stop), logged as an error."""


def _workers(server: Any) -> list[tuple[int, Any]]:
    """A snapshot of the master's workers, safe to take from another thread."""
    while True:
        try:
            return list(server.WORKERS.items())
        except RuntimeError:  # the master changed the table during the copy
            time.sleep(0.01)


def _hand_over(server: Any, handover: Handover, last_age: int, wanted: int) -> None:
    """Runs in a thread of the master: retire the workers up to ``last_age`` once
    ``wanted`` newer ones are ready, let their keep-alive clients go, then stop them."""
    deadline = time.monotonic() + HANDOVER_TIMEOUT_S
    while time.monotonic() < deadline:
        new = [w for _, w in _workers(server) if w.age > last_age]
        if sum(handover.state(w.age) == Handover.READY for w in new) >= wanted:
            break
        time.sleep(0.2)
    else:
        server.log.error(
            "Reload: the new workers are not ready after %g s; stopping the old ones anyway",
            HANDOVER_TIMEOUT_S,
        )
    old = [(pid, w) for pid, w in _workers(server) if w.age <= last_age]
    for _, w in old:
        handover.mark(w.age, Handover.RETIRING)
    server.log.info(
        "Reload: new workers ready; %d old ones close their keep-alive connections", len(old)
    )
    time.sleep(server.cfg.keepalive + 1.0)
    server.num_workers = server.cfg.workers
    for pid, _ in old:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    server.wakeup()


def on_reload(server: Any) -> None:
    """SIGHUP: keep the old workers in the count, so gunicorn does not stop them yet.

    gunicorn spawns the new workers right after this hook and then stops every
    worker beyond ``num_workers``, oldest first; :func:`_hand_over` lowers the
    count (and stops the old ones) once the new ones are ready.
    """
    old = _workers(server)
    if not old:
        return
    last_age = max(w.age for _, w in old)
    server.num_workers = len(old) + server.cfg.workers
    thread = threading.Thread(
        target=_hand_over,
        args=(server, server.heimdall_handover, last_age, server.cfg.workers),
        name="heimdall-handover",
        daemon=True,
    )
    thread.start()


def _drain_on_term(server: Any, drain: Drain, drain_s: float) -> None:
    """Make the master's SIGTERM drain for ``drain_s`` seconds before gunicorn's own stop.

    gunicorn closes its listeners as soon as it handles SIGTERM, so a load
    balancer that has not yet seen the instance go would get refused
    connections (or ones the kernel queues until the workers exit, then
    resets). Instead the first SIGTERM only marks the instance draining
    and queues a second SIGTERM ``drain_s`` later; that one (or an operator's)
    runs gunicorn's own handler. gunicorn looks its signal handlers up on the
    arbiter by name, so replacing the instance attribute is enough.
    """
    graceful_stop = server.handle_term

    def handle_term() -> None:
        if drain.active():
            graceful_stop()  # raises StopIteration: gunicorn halts gracefully
        drain.begin()
        server.log.info("Draining: /ready answers 503 for %g s, then graceful stop", drain_s)
        timer = threading.Timer(drain_s, server.signal, args=(signal.SIGTERM, None))
        timer.daemon = True
        timer.start()

    server.handle_term = handle_term


def on_starting(server: Any) -> None:
    """Empty the metrics directory and set up the drain, before any worker forks.

    Old workers' metric files would be counted again. The drain flag is kept on
    the arbiter, not in this module: a SIGHUP reloads this file, and workers
    forked after it must still share the flag the master sets.
    """
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink(missing_ok=True)
    server.heimdall_drain = Drain()
    server.heimdall_handover = Handover()
    if _settings.drain_s > 0:
        _drain_on_term(server, server.heimdall_drain, _settings.drain_s)


def post_fork(server: Any, worker: Any) -> None:
    """Hand the instance's drain flag and hand-over board to the new worker."""
    worker.heimdall_drain = server.heimdall_drain
    worker.heimdall_handover = server.heimdall_handover


def pre_request(worker: Any, req: Any) -> None:
    """Log the request at debug level (gunicorn's default); draining or retiring: close after it.

    After its response, a keep-alive client opens a new connection for its next request,
    which its load balancer sends to an instance that is not draining.
    """
    worker.log.debug("%s %s", req.method, req.path)
    if (
        worker.heimdall_drain.active()
        or worker.heimdall_handover.state(worker.age) == Handover.RETIRING
    ):
        req.must_close = True


def child_exit(server: Any, worker: Any) -> None:
    """Mark a dead worker's live gauges as gone (its counters still add up)."""
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


def _answer_server_errors_as_problems() -> None:
    """Make gunicorn answer the requests it refuses itself with problem documents.

    A request gunicorn cannot parse (bad request line, headers over
    ``limit_request_*``) never reaches the app; gunicorn writes its error page
    with ``gunicorn.util.write_error``, which this replaces in the worker.
    """
    from gunicorn import util

    from app.errors import server_problem_response

    def write_problem(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, server_problem_response(status_int, reason, mesg))

    util.write_error = write_problem


def post_worker_init(worker: Any) -> None:
    """Let /ready see the drain flag; resolve the served model; then report the worker ready.

    The first resolution imports MLflow and reads the registry (2-3 s); doing it
    here keeps that off the first client's latency. A registry that is not
    reachable yet is not fatal: the views retry and answer 503 meanwhile.
    """
    from app.health import DRAINING_EXTENSION
    from app.services import services
    from heimdall.errors import HeimdallError

    worker.wsgi.extensions[DRAINING_EXTENSION] = worker.heimdall_drain.active
    _answer_server_errors_as_problems()
    try:
        services(worker.wsgi).model.current()
    except HeimdallError as exc:
        worker.log.warning("model not resolved at start (will retry per request): %s", exc)
    worker.heimdall_handover.mark(worker.age, Handover.READY)
