"""An isolated Heimdall stack on this machine, for one benchmark run.

:func:`spawn` (base URL) and :func:`spawn_stack` (a :class:`Stack`) bring up,
all on 127.0.0.1 and in a fresh temporary folder:

* a private ``redis-server`` on a free port (never 6379): broker, results and
  cache in databases 0, 1 and 2, no persistence;
* the shipped model registered as ``heimdall-localizer@champion`` in an
  embedded sqlite MLflow registry under that folder (``MLFLOW_TRACKING_URI``
  stays unset, so every process derives the registry from ``HEIMDALL_VAR_DIR``);
* a real ``celery -A tasks worker --pool=prefork`` subprocess;
* ``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` on a free port;

then wait until ``GET /ready`` answers 200 with every pool child loaded, and
on exit stop everything (SIGTERM, then SIGKILL of each process group) and
remove the folder. Nothing of the machine's own service (Redis on 6379,
``var/``) is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
BROKER_DB, RESULTS_DB, CACHE_DB = 0, 1, 2

_ENV_PREFIXES = ("HEIMDALL_", "CELERY_", "MLFLOW_", "FLOWER_", "PROMETHEUS_")
STOP_TIMEOUT_S = 15.0
WARM_PARALLEL = 8
WARM_FAST_S = 0.5
"""A warm-up request slower than this (seconds) hit a worker still resolving the model."""


class StackError(RuntimeError):
    """The stack could not be brought up; the message carries the relevant log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(message: str) -> None:
    # Progress goes to stderr so a report printed on stdout stays clean.
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class _Proc:
    """One subprocess of the stack, in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of its whole process group."""
        proc = self.popen
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Pool children / gunicorn workers left behind by a leader that died
        # share its process group (start_new_session made pgid == pid).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Stack:
    """A running isolated stack: where it listens and how to reach its parts."""

    base_url: str
    workdir: Path
    redis_port: int
    worker_hostname: str
    worker_concurrency: int
    api_workers: int
    api_threads: int
    env: dict[str, str]
    """The full environment the service processes run with."""
    model: dict[str, Any] = field(default_factory=dict)
    """The registered model: name, version, alias, onnx_sha256."""
    ready: dict[str, Any] = field(default_factory=dict)
    """The body of the first 200 ``GET /ready``."""
    pids: dict[str, int] = field(default_factory=dict)
    """Leader pid of each process group: ``redis``, ``gunicorn``, ``worker``."""

    def redis_url(self, db: int) -> str:
        """URL of database ``db`` of the private Redis."""
        return f"redis://127.0.0.1:{self.redis_port}/{db}"

    @property
    def broker_url(self) -> str:
        """The Celery broker (database 0)."""
        return self.redis_url(BROKER_DB)

    @property
    def result_backend(self) -> str:
        """The Celery result backend (database 1)."""
        return self.redis_url(RESULTS_DB)

    @property
    def cache_url(self) -> str:
        """Cache, claim-check payloads and job records (database 2, ``HEIMDALL_REDIS_URL``)."""
        return self.redis_url(CACHE_DB)

    def redis_client(self, db: int = CACHE_DB) -> redis.Redis:
        """A new client of database ``db`` (bytes responses)."""
        return redis.Redis.from_url(self.redis_url(db), socket_connect_timeout=2.0)

    def celery_client(self, name: str = "heimdall-bench") -> Any:
        """A Celery client configured like the API's (``celeryconfig`` + this stack's URLs).

        Sends tasks by name only; the caller closes it.
        """
        from celery import Celery

        app = Celery(name, set_as_current=False)
        app.config_from_object("celeryconfig")
        # Explicit read/write URLs: a CELERY_BROKER_URL in this process's
        # environment would otherwise win over broker_url (as app/dispatch.py notes).
        app.conf.update(
            broker_url=self.broker_url,
            broker_read_url=self.broker_url,
            broker_write_url=self.broker_url,
            result_backend=self.result_backend,
        )
        app.backend_cls = self.result_backend
        return app


def _service_env(
    workdir: Path, redis_port: int, api_port: int, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """This process's environment without any service variable, plus the stack's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    env.update(
        {
            "HEIMDALL_VAR_DIR": str(workdir / "var"),
            # Never the checkout's var/run.env (the embedded make-run Redis).
            "HEIMDALL_ENV_FILE": "",
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/{BROKER_DB}",
            "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{redis_port}/{RESULTS_DB}",
            "HEIMDALL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{CACHE_DB}",
            "HEIMDALL_API_BIND": f"127.0.0.1:{api_port}",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Run a block with exactly ``env`` as ``os.environ``; restore it afterwards."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def register_shipped_model(env: Mapping[str, str], timeout_s: float = 300.0) -> dict[str, Any]:
    """Register the shipped model in the registry ``env`` points at.

    Returns its identity (name, version, alias) and the ``onnx_sha256`` of the
    file registered, so a report says which model produced its numbers.

    Retries while the shipped card and ONNX file disagree (sha mismatch: the
    model is being re-exported) until ``timeout_s``.
    """
    from heimdall.config import Settings
    from heimdall.errors import ModelCardInvalid
    from heimdall.modelcard import CARD_FILENAME, ModelCard
    from heimdall.registry import register_model, shipped_model_dir

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            card = ModelCard.load(shipped_model_dir() / CARD_FILENAME)
            with _environ(env):
                # Settings read here, with the stack's HEIMDALL_VAR_DIR and no
                # MLFLOW_TRACKING_URI: the embedded sqlite registry in the temp dir.
                identity, _ = register_model(Settings())
            # register_model checks the card against the ONNX file it registers.
            return {**identity.to_dict(), "onnx_sha256": card.onnx_sha256}
        except ModelCardInvalid as exc:
            if time.monotonic() > deadline:
                raise StackError(f"the shipped model stays inconsistent: {exc.detail}") from exc
            _say(f"shipped model not consistent yet ({exc.detail}); retrying in 15 s")
            time.sleep(15.0)


def _start_redis(workdir: Path, port: int) -> _Proc:
    if not os.path.exists(REDIS_BIN):
        raise StackError("redis-server not found (apt-get install -y redis-server)")
    log_path = workdir / "redis.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            [
                REDIS_BIN, "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir),
                "--databases", "16",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    proc = _Proc("redis", popen, log_path)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1.0)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"redis-server exited:\n{_tail(log_path)}")
        try:
            if client.ping():
                client.close()
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    proc.stop()
    raise StackError(f"redis-server did not answer PING in 10 s:\n{_tail(log_path)}")


def _start(name: str, argv: list[str], env: Mapping[str, str], workdir: Path) -> _Proc:
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
    return _Proc(name, popen, log_path)


def _wait_ready(
    base_url: str, procs: list[_Proc], concurrency: int, timeout_s: float
) -> dict[str, Any]:
    """Poll ``/ready`` until 200 with ``concurrency`` loaded children; its body."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with requests.Session() as http:
        while time.monotonic() < deadline:
            for proc in procs:
                if not proc.alive():
                    raise StackError(
                        f"{proc.name} exited ({proc.popen.returncode}):\n{_tail(proc.log_path)}"
                    )
            try:
                response = http.get(base_url + "/ready", timeout=5)
                last = f"{response.status_code} {response.text[:300]}"
                if response.status_code == 200:
                    body = dict(response.json())
                    # /ready needs one loaded child; a benchmark wants the whole pool.
                    if int(body.get("loaded_children", 0)) >= concurrency:
                        return body
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"  # not listening yet
            time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}.log\n{_tail(p.log_path)}" for p in procs)
    raise StackError(f"/ready not 200 within {timeout_s:g} s (last: {last})\n{logs}")


def warm_api(base_url: str, timeout_s: float = 60.0) -> int:
    """Make every gunicorn worker resolve the model before anything is measured.

    ``/ready`` turns 200 once *one* gunicorn worker has resolved the model; each
    other worker resolves it (importing MLflow: seconds) on its first request.
    Rounds of concurrent requests on fresh connections spread over the workers;
    a body with no receivers makes ``/api/v1/predict`` resolve the model and
    answer 4xx without dispatching anything. Returns the rounds it took.
    """
    body = b'{"receivers": [], "sample_rate_hz": 48000}'

    def probe(_: int) -> float:
        started = time.perf_counter()
        with contextlib.suppress(requests.RequestException):
            requests.post(
                base_url + "/api/v1/predict",
                data=body,
                headers={"Content-Type": "application/json", "Connection": "close"},
                timeout=30,
            )
        return time.perf_counter() - started

    deadline = time.monotonic() + timeout_s
    fast_rounds = rounds = 0
    with ThreadPoolExecutor(max_workers=WARM_PARALLEL) as pool:
        # Done after 3 rounds in a row where no request waited on a cold worker.
        while fast_rounds < 3 and time.monotonic() < deadline:
            rounds += 1
            slowest = max(pool.map(probe, range(WARM_PARALLEL)))
            fast_rounds = fast_rounds + 1 if slowest < WARM_FAST_S else 0
    return rounds


@contextlib.contextmanager
def spawn_stack(
    *,
    worker_concurrency: int = 2,
    api_workers: int = 2,
    api_threads: int = 256,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    register_timeout_s: float = 300.0,
    keep_workdir: bool = False,
) -> Iterator[Stack]:
    """Bring up an isolated stack and yield it; tear it down on exit.

    ``worker_concurrency`` prefork children, ``api_workers`` gunicorn workers of
    ``api_threads`` threads, ``extra_env`` on top of the service environment
    (e.g. ``{"HEIMDALL_PREDICT_TIMEOUT_S": "30"}``). With ``keep_workdir`` the
    temporary folder (logs, registry) is left for inspection.
    """
    workdir = Path(tempfile.mkdtemp(prefix="heimdall-bench-"))
    procs: list[_Proc] = []
    try:
        redis_port, api_port = free_port(), free_port()
        env = _service_env(workdir, redis_port, api_port, extra_env)
        (workdir / "prometheus").mkdir()
        _say(f"workdir {workdir}")
        procs.append(_start_redis(workdir, redis_port))
        _say(f"redis-server on 127.0.0.1:{redis_port}")
        identity = register_shipped_model(env, register_timeout_s)
        _say(f"registered {identity['name']} v{identity['version']}@{identity['alias']}")
        # gunicorn after the registry is written: its workers resolve the model
        # at start, and two processes creating the same sqlite registry at once
        # race in MLflow's schema migration.
        procs.append(
            _start(
                "gunicorn",
                [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
                {
                    **env,
                    "HEIMDALL_API_WORKERS": str(api_workers),
                    "HEIMDALL_API_THREADS": str(api_threads),
                    **{k: v for k, v in (extra_env or {}).items() if k.startswith("HEIMDALL_API_")},
                },
                workdir,
            )
        )
        # The worker resolves name@alias in its main process at start: after registering.
        # Flags and log level as deploy/supervisord.conf runs it, so logging costs count too.
        hostname = f"bench-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        procs.append(
            _start(
                "worker",
                [
                    sys.executable, "-m", "celery", "-A", "tasks", "worker",
                    "--pool=prefork", f"--concurrency={worker_concurrency}",
                    "-n", hostname, "--loglevel=INFO", "-E",
                ],
                env,
                workdir,
            )
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{api_port}"
        started = time.monotonic()
        ready = _wait_ready(base_url, procs, worker_concurrency, ready_timeout_s)
        rounds = warm_api(base_url)
        _say(f"ready at {base_url} after {time.monotonic() - started:.1f} s, warmed ({rounds})")
        yield Stack(
            base_url=base_url,
            workdir=workdir,
            redis_port=redis_port,
            worker_hostname=hostname,
            worker_concurrency=worker_concurrency,
            api_workers=api_workers,
            api_threads=int(env.get("HEIMDALL_API_THREADS", api_threads)),
            env=env,
            model=identity,
            ready=ready,
            pids={p.name: p.popen.pid for p in procs},
        )
    finally:
        # The API first (no new work), then the worker, then Redis under both.
        order = {"gunicorn": 0, "worker": 1, "redis": 2}
        for proc in sorted(procs, key=lambda p: order[p.name]):
            proc.stop()
        if keep_workdir:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def spawn(**options: Any) -> Iterator[str]:
    """:func:`spawn_stack`, yielding only the base URL (``http://127.0.0.1:PORT``)."""
    with spawn_stack(**options) as stack:
        yield stack.base_url
