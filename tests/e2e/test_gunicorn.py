"""The API as deployed: real gunicorn (deploy/gunicorn.conf.py), real HTTP, real worker.

gunicorn runs on a free port with the session's isolated environment (the same
Redis databases and registry as the worker fixture) and Prometheus in
multiprocess mode; the tests talk to it with ``requests`` only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"
MAX_BODY = 1_000_000
"""The API's body limit in these tests (bytes): a valid request fits, a padded one does not."""
START_TIMEOUT_S = 60.0
MakeRequest = Callable[..., dict[str, Any]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gunicorn:
    """A running gunicorn serving ``wsgi:app``."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    metrics_dir: Path

    def url(self, path: str) -> str:
        """Absolute URL of ``path``."""
        return self.base_url + path

    def log(self) -> str:
        """Everything gunicorn (and the app) wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def gunicorn(
    service_env: dict[str, str], celery_worker_proc: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    """gunicorn -c deploy/gunicorn.conf.py wsgi:app, 2 gthread workers, on a free port."""
    workdir = tmp_path_factory.mktemp("gunicorn")
    port = _free_port()
    metrics_dir = workdir / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "stale_from_last_run.db").write_bytes(b"")  # must be wiped at start
    env = {
        **service_env,
        "HEIMDALL_API_BIND": f"127.0.0.1:{port}",
        "HEIMDALL_API_WORKERS": "2",
        "HEIMDALL_MAX_REQUEST_BYTES": str(MAX_BODY),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PYTHONPATH": str(ROOT),
    }
    log_path = workdir / "gunicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Gunicorn(proc, f"http://127.0.0.1:{port}", log_path, metrics_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited ({proc.returncode}):\n{server.log()}")
        try:
            if requests.get(server.url("/health"), timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass  # not listening yet, or the workers are still importing the app
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"gunicorn did not answer in {START_TIMEOUT_S} s:\n{server.log()}")
        time.sleep(0.2)
    yield server
    proc.terminate()  # SIGTERM: graceful stop of the arbiter and its workers
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A requests session (keep-alive, like a real client)."""
    with requests.Session() as session:
        yield session


def _poll(http: requests.Session, url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(url, timeout=10).json()
        if body["status"] in ("succeeded", "failed"):
            return dict(body)
        time.sleep(0.05)
    pytest.fail(f"job {url} not done in {timeout} s")


def test_health_and_ready(gunicorn: Gunicorn, http: requests.Session) -> None:
    health = http.get(gunicorn.url("/health"), timeout=10)
    ready = http.get(gunicorn.url("/ready"), timeout=10)

    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["loaded_children"] >= 1
    assert body["model_versions"]
    assert not (gunicorn.metrics_dir / "stale_from_last_run.db").exists()


def test_predict_over_http(
    gunicorn: Gunicorn, http: requests.Session, request_factory: MakeRequest
) -> None:
    body = request_factory(9000)

    first = http.post(
        gunicorn.url("/api/v1/predict"), json=body, headers={"X-Request-ID": "e2e-1"}, timeout=60
    )
    second = http.post(gunicorn.url("/api/v1/predict"), json=body, timeout=60)

    assert first.status_code == 200, first.text
    assert first.headers["X-Request-ID"] == "e2e-1"
    result = first.json()
    assert result["cached"] is False and result["request_id"] == "e2e-1"
    assert 43.0 < result["position"]["latitude"] < 47.5
    assert result["model"]["name"] == "heimdall-localizer"
    # The second request may land on the other gunicorn worker: the cache is shared.
    assert second.json()["cached"] is True
    assert second.json()["position"] == result["position"]
    # The request id reaches the access log and the app's structured log line.
    log = gunicorn.log()
    assert "request_id=e2e-1" in log
    assert "route=/api/v1/predict" in log


def test_timeout_then_poll_and_batch_over_http(
    gunicorn: Gunicorn, http: requests.Session, request_factory: MakeRequest
) -> None:
    accepted = http.post(
        gunicorn.url("/api/v1/predict?timeout=0"), json=request_factory(9100), timeout=60
    )
    batch = http.post(
        gunicorn.url("/api/v1/predict/batch"),
        json={"items": [request_factory(9101), {"receivers": "none"}, request_factory(9102)]},
        timeout=60,
    )

    assert accepted.status_code == 202
    job = _poll(http, gunicorn.url(accepted.headers["Location"]))
    assert job["status"] == "succeeded"
    assert batch.status_code == 200, batch.text
    assert [it["status"] for it in batch.json()["items"]] == ["ok", "error", "ok"]
    assert batch.json()["items"][1]["problem"]["status"] == 400


def test_problems_over_http(gunicorn: Gunicorn, http: requests.Session) -> None:
    # Rejected before its body is read, then another request on the same
    # keep-alive connection: the connection must still be usable.
    for _ in range(30):
        not_json = http.post(
            gunicorn.url("/api/v1/predict"),
            data="x" * 100,
            headers={"Content-Type": "text/plain"},
            timeout=10,
        )
        missing = http.get(
            gunicorn.url("/api/v1/jobs/7f1c0c5e-0000-4000-8000-000000000000"), timeout=10
        )

        for response, status in ((not_json, 415), (missing, 404)):
            assert response.status_code == status
            assert response.headers["Content-Type"].startswith(PROBLEM)
            assert response.json()["status"] == status


def test_bodies_over_the_limit_are_refused_even_chunked(
    gunicorn: Gunicorn, request_factory: MakeRequest
) -> None:
    body = json.dumps(request_factory(5100)).encode()
    padded = body[:-1] + b"," + b'"pad":"' + b"x" * MAX_BODY + b'"}'

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 65_536):
            yield data[start : start + 65_536]

    # Fresh connections: the server closes one whose body it refused to read.
    sized = requests.post(
        gunicorn.url("/api/v1/predict"),
        data=padded,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    chunked = requests.post(
        gunicorn.url("/api/v1/predict"),
        data=chunks(padded),  # no Content-Length: Transfer-Encoding: chunked
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    fits = requests.post(
        gunicorn.url("/api/v1/predict"),
        data=chunks(body),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )

    for response in (sized, chunked):
        assert response.status_code == 413, response.text[:500]
        assert response.headers["Content-Type"].startswith(PROBLEM)
    assert fits.status_code == 200, fits.text[:500]


def test_metrics_over_http_are_multiprocess(
    gunicorn: Gunicorn, http: requests.Session, request_factory: MakeRequest
) -> None:
    body = request_factory(9200)
    for _ in range(3):
        http.post(gunicorn.url("/api/v1/predict"), json=body, timeout=60)

    text = http.get(gunicorn.url("/metrics"), timeout=10).text

    assert "heimdall_cache_hits_total" in text
    assert "heimdall_cache_misses_total" in text
    assert "flask_http_request_duration_seconds_bucket" in text
    assert list(gunicorn.metrics_dir.glob("*.db")), "multiprocess mode writes its files here"


def test_openapi_and_docs_over_http(gunicorn: Gunicorn, http: requests.Session) -> None:
    spec = http.get(gunicorn.url("/openapi.json"), timeout=10)
    docs = http.get(gunicorn.url("/docs"), timeout=10)

    assert spec.status_code == 200
    assert "/api/v1/predict/batch" in spec.json()["paths"]
    assert docs.status_code == 200 and docs.headers["Content-Type"].startswith("text/html")
    assert "/api/v1/jobs/{job_id}" in docs.text


def _raw_exchange(gunicorn: Gunicorn, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is on a new connection; the status, headers and body answered."""
    port = int(gunicorn.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-H: 1\r\n" * 120 + b"\r\n", 431),
    ],
    ids=["bad-request-line", "header-too-large", "too-many-headers"],
)
def test_requests_gunicorn_refuses_get_problem_documents(
    gunicorn: Gunicorn, request_bytes: bytes, status: int
) -> None:
    answered, headers, body = _raw_exchange(gunicorn, request_bytes)

    assert answered == status, body
    assert headers["content-type"] == PROBLEM, headers
    problem = json.loads(body)
    assert problem["status"] == status
    assert problem["type"].startswith("urn:heimdall:problem:")
    assert problem["title"] and problem["detail"], problem
    # The server still answers afterwards.
    assert requests.get(gunicorn.url("/health"), timeout=10).status_code == 200


def test_a_body_shorter_than_its_content_length_is_a_400(gunicorn: Gunicorn) -> None:
    head = (
        b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\nConnection: close\r\n\r\n"
    )
    port = int(gunicorn.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b'{"receivers": [')
        sock.shutdown(socket.SHUT_WR)  # the client gives up mid-body
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk

    status = int(reply.split(b" ", 2)[1]) if reply else None
    # Either a 400 problem reaches the client, or nothing does; never a 5xx.
    assert status in (400, None), reply
    assert requests.get(gunicorn.url("/health"), timeout=10).status_code == 200
    assert "Traceback" not in gunicorn.log()
