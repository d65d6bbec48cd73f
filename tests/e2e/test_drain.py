"""SIGTERM drains, nothing lost: the API (real gunicorn) and the worker (real Celery).

The module runs a service of its own on the session's private Redis (broker,
results, state and cache on databases nobody else uses), so the session's
shared worker never takes its tasks and no other test sees its heartbeats.
Each test starts its own gunicorn and workers and stops what it started. The
workers are not waited on with a control broadcast: Celery publishes it through
the client app's producer pool, whose broker is this process's CELERY_BROKER_URL
(the session's database), so a worker on these databases never hears it. The
tests wait on /ready (heartbeats) or on the jobs instead.
Nothing asserts a timing beyond "within the deadline": what the clients saw
and when is printed as JSON for the record.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from app import create_app
from app.health import DRAINING_EXTENSION, DRAINING_PROBLEM
from app.schemas import NotReady

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BROKER_DB, RESULTS_DB, STATE_DB, CACHE_DB = 24, 25, 26, 27
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 150.0
DRAIN_S = 8.0
SEND_MARGIN_S = 3.0
"""Clients stop sending this long before the drain can end, as a load balancer would
have stopped sending long before: a connection still waiting to be accepted when
the listeners close is reset by the kernel, and that is what the drain is for."""
MakeRequest = Callable[..., dict[str, Any]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(
    what: str, condition: Callable[[], bool], timeout: float, log: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s\n{log()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def drain_env(service_env: dict[str, str], redis_server: Any) -> dict[str, str]:
    """The environment of this module's own service (same registry, own Redis databases)."""
    for db in (BROKER_DB, RESULTS_DB, STATE_DB, CACHE_DB):
        redis_server.client(db).flushdb()
    return {
        **service_env,
        "CELERY_BROKER_URL": redis_server.url_for(BROKER_DB),
        "CELERY_RESULT_BACKEND": redis_server.url_for(RESULTS_DB),
        "HEIMDALL_REDIS_URL": redis_server.url_for(STATE_DB),
        "HEIMDALL_CACHE_REDIS_URL": redis_server.url_for(CACHE_DB),
        "HEIMDALL_HEARTBEAT_INTERVAL_S": "2",
        "PYTHONPATH": str(ROOT),
    }


@dataclass
class Gunicorn:
    """A running ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def url(self, path: str) -> str:
        """Absolute URL of ``path``."""
        return self.base_url + path

    def log(self) -> str:
        """Everything gunicorn (and the app) wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group, if it is still there."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def start_gunicorn(
    drain_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[[dict[str, str]], Gunicorn]]:
    """``start(env_overrides)``: gunicorn with 2 gthread workers on a free port, answering."""
    started: list[Gunicorn] = []

    def start(overrides: dict[str, str]) -> Gunicorn:
        port = _free_port()
        metrics_dir = tmp_path / f"prometheus-{port}"
        metrics_dir.mkdir()
        env = {
            **drain_env,
            "HEIMDALL_API_BIND": f"127.0.0.1:{port}",
            "HEIMDALL_API_WORKERS": "2",
            "HEIMDALL_API_CONTROL_SOCKET": "off",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            **overrides,
        }
        log_path = tmp_path / f"gunicorn-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Gunicorn(proc, f"http://127.0.0.1:{port}", log_path)
        started.append(server)

        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited ({proc.returncode}):\n{server.log()}")
            with contextlib.suppress(requests.RequestException):
                return requests.get(server.url("/health"), timeout=2).status_code == 200
            return False

        _wait_until("gunicorn answers /health", answers, START_TIMEOUT_S, server.log)
        return server

    yield start
    for server in started:
        server.kill()


@dataclass
class Sent:
    """One request a client sent: when (monotonic s) and what came back."""

    started: float
    ended: float
    outcome: int | str
    """The HTTP status, or the name of the exception (a reset, a refused connection)."""


@dataclass
class Clients:
    """Keep-alive clients posting predictions in threads until told to stop."""

    url: str
    bodies: list[dict[str, Any]]
    count: int = 6
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.count)
        ]

    def _run(self, index: int) -> None:
        with requests.Session() as session:
            n = index
            while not self._stop.is_set():
                body = self.bodies[n % len(self.bodies)]
                n += self.count
                started = time.monotonic()
                try:
                    outcome: int | str = session.post(self.url, json=body, timeout=60).status_code
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                with self._lock:
                    self.sent.append(Sent(started, time.monotonic(), outcome))

    def start(self) -> None:
        """Start every client."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending; wait for the requests in flight."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def answered(self) -> int:
        """Requests answered 200 so far."""
        with self._lock:
            return sum(1 for s in self.sent if s.outcome == 200)


def _probe(url: str) -> int | str:
    try:
        # A new connection each time, like a load balancer's health check.
        return requests.get(url, timeout=10, headers={"Connection": "close"}).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def _trickled_post(port: int, path: str, body: bytes, finish: threading.Event) -> int:
    """POST half of ``body`` now, the rest once ``finish`` is set; the status answered.

    A request in flight for as long as the test likes: an upload that is still
    arriving when the server stops accepting.
    """
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    half = len(body) // 2
    with socket.create_connection(("127.0.0.1", port), timeout=STOP_TIMEOUT_S) as sock:
        sock.sendall(head.encode() + body[:half])
        finish.wait(STOP_TIMEOUT_S)
        sock.sendall(body[half:])
        status_line = sock.makefile("rb").readline()  # b"HTTP/1.1 200 OK\r\n"
    return int(status_line.split()[1])


def _changes(probes: list[tuple[float, int | str, int | str]]) -> list[Any]:
    """The probes where the answers changed (seconds after SIGTERM, /ready, /health)."""
    return [p for i, p in enumerate(probes) if i == 0 or p[1:] != probes[i - 1][1:]]


def test_ready_answers_draining_while_health_stays_ok(service_env: dict[str, str]) -> None:
    app = create_app()
    client = app.test_client()
    # What deploy/gunicorn.conf.py installs in each worker; here the drain has begun.
    app.extensions[DRAINING_EXTENSION] = lambda: True

    ready = client.get("/ready")
    health = client.get("/health")

    assert ready.status_code == 503
    assert ready.headers["Content-Type"].startswith("application/problem+json")
    assert ready.get_json() == {**DRAINING_PROBLEM, "request_id": ready.headers["X-Request-ID"]}
    NotReady.model_validate(ready.get_json())  # the document /openapi.json declares
    assert health.status_code == 200


def test_without_a_drain_sigterm_stops_at_once(
    start_gunicorn: Callable[[dict[str, str]], Gunicorn],
) -> None:
    api = start_gunicorn({"HEIMDALL_DRAIN_S": "0"})

    api.proc.send_signal(signal.SIGTERM)
    returncode = api.proc.wait(timeout=STOP_TIMEOUT_S)

    assert returncode == 0, api.log()
    assert "Draining" not in api.log()
    assert "Shutting down: Master" in api.log()


def test_sigterm_to_the_api_drains_before_it_stops(
    drain_env: dict[str, str],
    start_gunicorn: Callable[[dict[str, str]], Gunicorn],
    worker_factory: Callable[..., Any],
    request_factory: MakeRequest,
) -> None:
    worker = worker_factory("drain-api-worker@%h", env_overrides=drain_env, wait=None)
    try:
        # No cache: every prediction waits for the worker, and a long wait budget
        # so a busy machine makes no 202 (graceful_timeout follows it: 30 s).
        api = start_gunicorn(
            {
                "HEIMDALL_DRAIN_S": str(DRAIN_S),
                "HEIMDALL_CACHE_TTL_S": "0",
                "HEIMDALL_PREDICT_TIMEOUT_S": "20",
            }
        )
        port = int(api.base_url.rsplit(":", 1)[1])
        _wait_until(
            "/ready is 200", lambda: _probe(api.url("/ready")) == 200, START_TIMEOUT_S, api.log
        )
        clients = Clients(
            api.url("/api/v1/predict"), [request_factory(91_000 + i) for i in range(24)]
        )
        probes: list[tuple[float, int | str, int | str]] = []
        probing = threading.Event()

        def probe_loop() -> None:
            while not probing.is_set():
                probes.append(
                    (time.monotonic(), _probe(api.url("/ready")), _probe(api.url("/health")))
                )
                time.sleep(0.2)

        prober = threading.Thread(target=probe_loop, daemon=True)
        drain_over = threading.Event()
        trickled: list[int] = []
        trickle = threading.Thread(
            target=lambda: trickled.append(
                _trickled_post(
                    port,
                    "/api/v1/predict",
                    json.dumps(request_factory(91_100)).encode(),
                    drain_over,
                )
            ),
            daemon=True,
        )
        clients.start()
        try:
            _wait_until("predictions are answered", lambda: clients.answered() >= 20, 120)
            assert _probe(api.url("/ready")) == 200, api.log()
            prober.start()
            sigterm_at = time.monotonic()
            api.proc.send_signal(signal.SIGTERM)
            # The drain lasts at least DRAIN_S from here (the master starts it
            # when it handles the signal, not before it is sent).
            time.sleep(DRAIN_S - SEND_MARGIN_S)
            trickle.start()
        finally:
            clients.stop()
        try:
            # The upload started during the drain ends after the drain: the master
            # has handled its second SIGTERM, closed its listeners and told the
            # workers to finish. (New connections are not refused yet: until the
            # last worker exits, the kernel still queues them on its copy of the
            # listening socket, then resets them. Hence the drain.)
            _wait_until(
                "the drain ends",
                lambda: api.log().count("Handling signal: term") >= 2,
                STOP_TIMEOUT_S,
                api.log,
            )
            time.sleep(1.0)  # so the workers have their SIGTERM before the upload ends
            drain_over.set()
            trickle.join(timeout=STOP_TIMEOUT_S)
            returncode = api.proc.wait(timeout=STOP_TIMEOUT_S)
            stopped_after_s = time.monotonic() - sigterm_at
        finally:
            drain_over.set()
            probing.set()
            prober.join(timeout=30)
    finally:
        worker.stop(timeout=60)

    ready_503 = [t for t, ready, _ in probes if t > sigterm_at and ready == 503]
    first_503 = min(ready_503, default=float("inf"))
    answered_while_draining = sum(
        1 for s in clients.sent if s.started > first_503 and s.outcome == 200
    )
    report = {
        "drain_s": DRAIN_S,
        "first_ready_503_after_s": round(first_503 - sigterm_at, 2) if ready_503 else None,
        "sent": len(clients.sent),
        "outcomes": sorted({str(s.outcome) for s in clients.sent}),
        "answered_while_draining": answered_while_draining,
        "upload_in_flight_at_close": trickled,
        "stopped_after_s": round(stopped_after_s, 2),
        "probes": _changes([(round(t - sigterm_at, 2), r, h) for t, r, h in probes]),
    }
    print(json.dumps(report))
    log = api.log()
    assert returncode == 0, log
    assert "Draining" in log, log
    # /ready turned 503 while /health stayed 200 and predictions were still answered.
    assert ready_503, report
    assert all(health == 200 for t, ready, health in probes if ready == 503), report
    assert answered_while_draining > 0, report
    # Every request sent before the drain ended was answered, none reset or 5xx.
    assert [s for s in clients.sent if s.outcome != 200] == [], report
    # A request still arriving when the listeners closed was answered all the same.
    assert trickled == [200], report
    # Once /ready said 503, it never said 200 again before the listeners closed.
    assert all(ready != 200 for t, ready, _ in probes if t > first_503), report


def test_sigterm_to_the_worker_loses_no_job(
    drain_env: dict[str, str],
    start_gunicorn: Callable[[dict[str, str]], Gunicorn],
    worker_factory: Callable[..., Any],
    request_factory: MakeRequest,
    redis_server: Any,
) -> None:
    api = start_gunicorn({})
    broker: redis.Redis = redis_server.client(BROKER_DB)
    # Only this test's messages: nothing another test of the module left behind.
    broker.flushdb()
    jobs: list[str] = []
    with requests.Session() as http:
        # Queued while no worker runs: the first worker finds a backlog it cannot
        # finish before it is told to stop.
        for i in range(200):
            accepted = http.post(
                api.url("/api/v1/predict?timeout=0"), json=request_factory(92_000 + i), timeout=60
            )
            assert accepted.status_code == 202, accepted.text
            jobs.append(api.url(accepted.headers["Location"]))

        def states() -> list[str]:
            return [str(http.get(url, timeout=30).json()["status"]) for url in jobs]

        first = worker_factory("drain-first-worker@%h", env_overrides=drain_env, wait=None)
        try:
            # Jobs leave the queue in the order they came: the first one done
            # means the worker is at work on the backlog.
            _wait_until(
                "the first worker answers a job",
                lambda: http.get(jobs[0], timeout=30).json()["status"] == "succeeded",
                START_TIMEOUT_S,
                first.log,
            )
            assert first.proc is not None
            stopping = first.proc
            stopping.send_signal(signal.SIGTERM)  # warm shutdown of the main process
            returncode = stopping.wait(timeout=STOP_TIMEOUT_S)
        finally:
            first.stop()
        after_first = states()
        # Its reserved messages went back to the queue as it closed the broker
        # connection: none waits out the visibility timeout.
        unacked = broker.hlen("unacked")
        queued = broker.llen("celery")

        second = worker_factory("drain-second-worker@%h", env_overrides=drain_env, wait=None)
        try:
            _wait_until(
                "the second worker answers every job",
                lambda: all(state == "succeeded" for state in states()),
                ANSWER_TIMEOUT_S,
                second.log,
            )
        finally:
            second.stop(timeout=60)
        final = states()

    report = {
        "jobs": len(jobs),
        "succeeded_by_the_first_worker": after_first.count("succeeded"),
        "unacked_after_shutdown": unacked,
        "queued_after_shutdown": queued,
        "first_worker_exit": returncode,
    }
    print(json.dumps(report))
    assert returncode == 0, first.log()
    assert unacked == 0, report
    # The premise: the first worker stopped with jobs left (queued or running).
    assert after_first.count("succeeded") < len(jobs), report
    assert final == ["succeeded"] * len(jobs), report


def _worker_pids(api: Gunicorn) -> set[int]:
    """The pids of the master's worker processes right now."""
    children = Path(f"/proc/{api.proc.pid}/task/{api.proc.pid}/children").read_text().split()
    return {int(pid) for pid in children}


def test_sighup_replaces_the_workers_without_a_gap(
    drain_env: dict[str, str],
    start_gunicorn: Callable[[dict[str, str]], Gunicorn],
    worker_factory: Callable[..., Any],
    request_factory: MakeRequest,
) -> None:
    worker = worker_factory("reload-api-worker@%h", env_overrides=drain_env, wait=None)
    try:
        api = start_gunicorn({"HEIMDALL_CACHE_TTL_S": "0", "HEIMDALL_PREDICT_TIMEOUT_S": "20"})
        _wait_until(
            "/ready is 200", lambda: _probe(api.url("/ready")) == 200, START_TIMEOUT_S, api.log
        )
        old_pids = _worker_pids(api)
        clients = Clients(
            api.url("/api/v1/predict"), [request_factory(93_000 + i) for i in range(24)]
        )
        clients.start()
        try:
            _wait_until("predictions are answered", lambda: clients.answered() >= 20, 120)
            hup_at = time.monotonic()
            api.proc.send_signal(signal.SIGHUP)

            def replaced() -> bool:
                pids = _worker_pids(api)
                return len(pids) == 2 and not pids & old_pids

            _wait_until("the old workers are replaced", replaced, STOP_TIMEOUT_S, api.log)
            replaced_after_s = time.monotonic() - hup_at
            answered_at_replacement = clients.answered()
            _wait_until(
                "the new workers answer",
                lambda: clients.answered() >= answered_at_replacement + 20,
                120,
                api.log,
            )
        finally:
            clients.stop()
    finally:
        worker.stop(timeout=60)

    sent = sorted(clients.sent, key=lambda s: s.ended)
    after_hup = [s.ended for s in sent if s.ended > hup_at]
    gaps = [b - a for a, b in itertools.pairwise(after_hup)]
    report = {
        "sent": len(sent),
        "outcomes": sorted({str(s.outcome) for s in sent}),
        "replaced_after_s": round(replaced_after_s, 2),
        "longest_gap_between_answers_after_sighup_s": round(max(gaps, default=0.0), 2),
    }
    print(json.dumps(report))
    log = api.log()
    assert "Reload: new workers ready" in log, log
    # Every request sent around the reload was answered: none reset, refused or 5xx.
    assert [s for s in sent if s.outcome != 200] == [], report
