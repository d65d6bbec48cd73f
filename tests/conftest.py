"""Shared fixtures: a private Redis, an isolated service environment, real workers.

Everything runs against real things (STYLE.md #7): a ``redis-server`` on a free
port (never the machine's 6379), a sqlite MLflow registry in a temporary folder
holding the shipped model, and ``celery -A tasks worker`` subprocesses. No eager
mode, no mocks, no Docker (pytest runs with ``-p no:celery``).

Fixtures (names are an API other test modules rely on):

* ``redis_server`` (session) -> :class:`RedisServer` (``.url``, ``.port``,
  ``.url_for(db)``, ``.stop()``, ``.start()``, ``.client(db)``)
* ``service_env`` (session) -> dict: the full environment of an isolated service
  (also applied to this process's ``os.environ`` for the session)
* ``worker_factory`` (session) -> ``start(name, env_overrides=None, wait="loaded",
  queues=None)`` -> :class:`WorkerProcess`
* ``celery_worker_proc`` (session) -> :class:`WorkerProcess` (the shared worker)
* ``celery_client`` (session) -> Celery client app configured like the API's
* ``request_factory`` (session) -> ``make_request(seed, n_samples=2048, encoding="base64",
  stations=None) -> dict`` request body
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.utils.nodenames import host_format

from celeryconfig import make_app
from heimdall.config import get_settings
from heimdall.modelcard import MODEL_FILENAME
from heimdall.registry import register_model, shipped_model_dir
from heimdall.simulate.requests import simulated_request

ROOT = Path(__file__).resolve().parents[1]
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
WORKER_READY_TIMEOUT_S = 60.0

# Databases of the private Redis: queues, results, state (jobs, payloads,
# heartbeats) and the prediction cache are kept apart so a test can flush one
# without breaking the others.
BROKER_DB, RESULTS_DB, STATE_DB, CACHE_DB = 0, 1, 2, 6
# A second, isolated service (e.g. a worker with an empty registry) uses these
# (state in ALT_CACHE_DB, prediction cache in ALT_PREDICTIONS_DB).
ALT_BROKER_DB, ALT_RESULTS_DB, ALT_CACHE_DB = 3, 4, 5
ALT_PREDICTIONS_DB = 16

_ENV_PREFIXES = ("HEIMDALL_", "CELERY_", "MLFLOW_", "FLOWER_")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 (no persistence configured)."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """URL of database ``db`` of this server."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A new client of database ``db`` (bytes responses)."""
        return redis.Redis.from_url(self.url_for(db), socket_connect_timeout=1.0)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again, on the same port) and wait until it answers PING.

        After :meth:`stop` the data saved at stop time is loaded back.
        """
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    REDIS_BIN,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                    "--dbfilename", "dump.rdb",
                    "--databases", "32",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.log_path}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer within {timeout} s")

    def stop(self, *, keep_data: bool = True) -> None:
        """Stop the server, simulating Redis down.

        With ``keep_data`` (default) a snapshot is written first, so
        :meth:`start` comes back like a persistent Redis after a restart
        (queues, results and worker readiness survive); without it the
        data is lost, like a cache-only Redis.
        """
        if not self.running or self._proc is None:
            return
        if keep_data:
            try:
                self.client().shutdown(save=True)
            except redis.ConnectionError:
                pass  # expected: the server closes the connection as it exits
            except redis.RedisError:
                self._proc.terminate()
        else:
            (self.workdir / "dump.rdb").unlink(missing_ok=True)
            self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def kill(self) -> None:
        """Kill the server at once (used at the end of the session)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port for the whole session.

    Yields a :class:`RedisServer`: ``.url`` (db 0), ``.port``, ``.url_for(db)``,
    ``.client(db)``, and ``.stop()`` / ``.start()`` to simulate Redis down and
    back. The machine's Redis on 6379 is never touched.
    """
    if not os.path.exists(REDIS_BIN):
        pytest.fail("redis-server not found; install it: sudo apt-get install -y redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def service_env(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Environment of a fully isolated service, applied to this process too.

    A dict holding the whole environment for subprocesses (PATH etc. plus the
    service's variables): ``HEIMDALL_VAR_DIR`` is a temporary folder holding the
    embedded sqlite MLflow registry (``MLFLOW_TRACKING_URI`` is unset so the
    registry keeps its artifacts under that folder too), the broker, result
    backend and cache are databases 0/1/2 of the private Redis, and timeouts
    are short. Any ``HEIMDALL_*``/``CELERY_*``/``MLFLOW_*`` variable of the
    outer environment is removed. The shipped model is registered there as
    ``heimdall-localizer@champion``. ``os.environ`` of the test process is
    patched for the session and ``get_settings`` cleared, so in-process
    ``Settings`` match the workers'.
    """
    if not (shipped_model_dir() / MODEL_FILENAME).is_file():
        pytest.fail(f"the trained model is not shipped yet: {shipped_model_dir() / MODEL_FILENAME}")
    var_dir = tmp_path_factory.mktemp("var")
    overrides = {
        "HEIMDALL_VAR_DIR": str(var_dir),
        "HEIMDALL_ENV_FILE": "",
        "CELERY_BROKER_URL": redis_server.url_for(BROKER_DB),
        "CELERY_RESULT_BACKEND": redis_server.url_for(RESULTS_DB),
        "HEIMDALL_REDIS_URL": redis_server.url_for(STATE_DB),
        "HEIMDALL_CACHE_REDIS_URL": redis_server.url_for(CACHE_DB),
        "HEIMDALL_PREDICT_TIMEOUT_S": "3",
        "HEIMDALL_TASK_TIME_LIMIT_S": "30",
        "HEIMDALL_MODEL_REFRESH_S": "1",
        "HEIMDALL_RESULT_EXPIRES_S": "600",
        "HEIMDALL_CACHE_TTL_S": "600",
        "HEIMDALL_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(_ENV_PREFIXES):
                mp.delenv(name)
        for name, value in overrides.items():
            mp.setenv(name, value)
        get_settings.cache_clear()
        register_model(get_settings())
        yield dict(os.environ)
    get_settings.cache_clear()


def make_client(env: dict[str, str], name: str = "heimdall-test-client") -> Celery:
    """A Celery client app like the API's (``celeryconfig.make_app``) on ``env``'s Redis."""
    settings = get_settings().model_copy(
        update={
            "broker_url": env["CELERY_BROKER_URL"],
            "result_backend": env["CELERY_RESULT_BACKEND"],
        }
    )
    return make_app(name, settings)


class WorkerProcess:
    """A real ``celery -A tasks worker --pool=prefork`` subprocess."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 2,
        queues: str | None = None,
    ) -> None:
        self.name = name
        self.hostname = host_format(name)
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.queues = queues
        self.client = make_client(env, f"client-of-{name}")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the worker's main process (None when stopped)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, wait: str | None = "loaded", timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        """Start the worker; with ``wait`` block until every child reports that state."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "tasks", "worker",
                    "--pool=prefork", f"--concurrency={self.concurrency}",
                    "-n", self.name, "--loglevel=INFO", "-E",
                    *(["-Q", self.queues] if self.queues else []),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
            )  # fmt: skip
        if wait:
            self.wait_for(lambda s: _all_children(s, wait), timeout=timeout)

    def broadcast(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 1.0
    ) -> dict[str, Any] | None:
        """Send a control command to this worker only; its reply, None if it does not answer."""
        # An explicit connection: Celery's CELERY_BROKER_URL in this process's
        # environment would win over the client's broker_url setting.
        with self.client.connection_for_write(self.env["CELERY_BROKER_URL"]) as connection:
            replies = self.client.control.broadcast(
                command,
                arguments=arguments or {},
                connection=connection,
                reply=True,
                timeout=timeout,
                limit=1,
                destination=[self.hostname],
            )
        for reply in replies or []:
            if self.hostname in reply:
                return dict(reply[self.hostname])
        return None

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """This worker's ``heimdall_model_status`` reply, None when it does not answer."""
        return self.broadcast("heimdall_model_status", timeout=timeout)

    def wait_for(
        self,
        condition: Callable[[dict[str, Any]], bool],
        timeout: float = WORKER_READY_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Poll the status until ``condition(status)``; fail with the worker log if not."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited ({self.proc.returncode}):\n{self.log()}")
            last = self.status()
            if last is not None and condition(last):
                return last
            time.sleep(0.2)
        pytest.fail(f"worker {self.name} not ready in {timeout} s; status {last}:\n{self.log()}")

    def log(self, tail: int = 200) -> str:
        """The last ``tail`` lines of the worker log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of its process group."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        # Pool children die with the main process (PDEATHSIG); make sure.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self, wait: str | None = "loaded") -> None:
        """Stop and start again (same name, environment and log)."""
        self.stop()
        self.start(wait=wait)

    def close(self) -> None:
        """Stop the worker and release the client's connections."""
        self.stop()
        self.client.close()


def _all_children(status: dict[str, Any], state: str) -> bool:
    children = status.get("children") or []
    return bool(children) and all(c.get("state") == state for c in children)


@pytest.fixture(scope="session")
def worker_factory(
    service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start extra real workers: ``start(name, env_overrides=None, wait="loaded", queues=None)``.

    ``name`` is the ``-n`` node name (``%h`` allowed), ``env_overrides`` are
    applied on top of ``service_env``, ``wait`` is the child state to wait for
    ("loaded", "failed" or None), ``queues`` the worker's ``-Q`` (default: the
    shared "celery" queue). Returns a :class:`WorkerProcess`; every worker
    started is stopped at the end of the session.

    A worker on other broker/backend databases is reachable from this process
    only through explicit connections (Celery's ``CELERY_BROKER_URL`` /
    ``CELERY_RESULT_BACKEND`` environment variables, set here by
    ``service_env``, win over an app's settings); ``.status()`` and
    ``.wait_for()`` do that. To send tasks to a separate worker, prefer
    ``queues`` on the shared broker.
    """
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(
        name: str,
        env_overrides: dict[str, str] | None = None,
        wait: str | None = "loaded",
        queues: str | None = None,
    ) -> WorkerProcess:
        env = {**service_env, **(env_overrides or {})}
        worker = WorkerProcess(name, env, logs / f"{name.split('@')[0]}.log", queues=queues)
        started.append(worker)
        worker.start(wait=wait)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture(scope="session")
def celery_worker_proc(worker_factory: Callable[..., WorkerProcess]) -> WorkerProcess:
    """The session's real worker, ``test-worker@%h``, 2 prefork children, model loaded.

    A :class:`WorkerProcess`: ``.log_path``, ``.hostname``, ``.pid``,
    ``.status()``, ``.broadcast(command, arguments)``, ``.wait_for(condition)``,
    ``.log()``, ``.stop()``, ``.start()``, ``.restart()``. Terminated (SIGTERM,
    then SIGKILL) at the end.
    """
    return worker_factory("test-worker@%h")


@pytest.fixture(scope="session")
def celery_client(service_env: dict[str, str]) -> Iterator[Celery]:
    """A Celery client app configured like the API's: sends tasks by name only."""
    app = make_client(service_env)
    yield app
    app.close()


def make_request(
    seed: int,
    n_samples: int = 2048,
    encoding: str = "base64",
    stations: list[str] | None = None,
) -> dict[str, Any]:
    """A valid predict request body from one simulated scene.

    The transmitter is drawn with ``seed`` over the packaged network at 48 kHz;
    every station the scene has (or exactly ``stations``) sends ``n_samples``
    samples, as base64 complex64 (``encoding="base64"``) or ``[[I, Q], ...]``
    (``encoding="pairs"``).
    """
    body = simulated_request(seed, n_samples, encoding, stations=stations)
    body.pop("truth")
    return body


@pytest.fixture(scope="session")
def request_factory() -> Callable[..., dict[str, Any]]:
    """``make_request(seed, n_samples=2048, encoding="base64"|"pairs", stations=None)``."""
    return make_request
