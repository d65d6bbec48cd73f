"""Safe defaults against real things: the API on the session's Redis and worker,
`heimdall model reload` against a real worker of its own, Flower started for real.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from app import SECURITY_HEADERS, create_app
from heimdall.config import Settings
from heimdall.errors import MAX_DETAIL_CHARS, MAX_QUOTED_CHARS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MEGABYTE = 1_000_000
MakeRequest = Callable[..., dict[str, Any]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app(service_env: dict[str, str], celery_worker_proc: Any) -> Flask:
    """The API wired to the session's Redis and worker."""
    return create_app(Settings())


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the API."""
    return app.test_client()


def _assert_security_headers(response: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers)


# -- security headers -------------------------------------------------------------------------


def test_every_kind_of_response_carries_the_security_headers(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    responses = {
        "health": client.get("/health"),
        "stations": client.get("/api/v1/stations"),
        "openapi": client.get("/openapi.json"),
        "docs": client.get("/docs"),
        "not found": client.get("/no/such/page"),
        "method": client.delete("/api/v1/predict"),
        "bad json": client.post(
            "/api/v1/predict", data="{", headers={"content-type": "application/json"}
        ),
        "predict": client.post("/api/v1/predict", json=request_factory(9601)),
    }
    assert responses["predict"].status_code == 200, responses["predict"].get_data(as_text=True)
    assert responses["not found"].status_code == 404
    assert responses["bad json"].status_code == 400
    for name, response in responses.items():
        assert response.status_code < 500, name
        _assert_security_headers(response)


# -- bounded problem documents ----------------------------------------------------------------


def test_a_megabyte_station_id_is_not_echoed(
    client: FlaskClient, request_factory: MakeRequest
) -> None:
    body = request_factory(9602)
    body["receivers"][0]["station"] = "Z" * MEGABYTE
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 422
    problem = response.get_json()
    assert problem["type"] == "urn:heimdall:problem:unknown-station"
    assert len(problem["detail"]) <= MAX_DETAIL_CHARS
    assert all(
        len(value) <= MAX_DETAIL_CHARS for value in problem.values() if isinstance(value, str)
    )
    assert len(response.get_data()) < 4 * MAX_DETAIL_CHARS
    _assert_security_headers(response)


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/api/v1/predict?timeout=" + "9" * MEGABYTE, {"json": {}}),
        ("post", "/api/v1/predict", {"data": b"x", "content_type": "text/" + "p" * MEGABYTE}),
        ("get", "/api/v1/jobs/" + "j" * MEGABYTE, {}),
    ],
    ids=["query", "content-type", "path"],
)
def test_other_megabyte_inputs_are_not_echoed(
    client: FlaskClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    response = getattr(client, method)(path, **kwargs)
    assert 400 <= response.status_code < 500
    problem = response.get_json()
    assert len(problem["detail"]) <= MAX_DETAIL_CHARS
    assert len(problem.get("field") or "") <= MAX_QUOTED_CHARS
    assert len(response.get_data()) < 4 * MAX_DETAIL_CHARS


# -- heimdall model reload exit status --------------------------------------------------------


@pytest.fixture(scope="module")
def reload_worker(worker_factory: Callable[..., Any], service_env: dict[str, str]) -> str:
    """A worker of its own (on a queue of its own): its node name."""
    worker = worker_factory("reload-worker@%h", queues="heimdall-reload")
    return str(worker.hostname)


def _reload(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "heimdall"), "model", "reload", "--timeout", "10", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_reload_exits_non_zero_when_a_worker_fails(
    reload_worker: str, service_env: dict[str, str]
) -> None:
    out = _reload(service_env, "--destination", reload_worker, "--alias", "no-such-alias")
    assert out.returncode == 1, out
    assert f"FAILED  {reload_worker}: " in out.stdout
    assert "still serving heimdall-localizer v1 (champion)" in out.stdout


def test_reload_exits_zero_when_every_worker_reloads(
    reload_worker: str, service_env: dict[str, str]
) -> None:
    out = _reload(service_env, "--destination", reload_worker)
    assert out.returncode == 0, out
    assert out.stdout.startswith(f"ok      {reload_worker}: now serving heimdall-localizer v1")


def test_reload_exits_non_zero_when_no_worker_answers(service_env: dict[str, str]) -> None:
    out = _reload({**service_env}, "--destination", "nobody@nowhere")
    assert out.returncode == 1, out
    assert "no worker replied" in out.stdout


# -- Flower off loopback with a real password --------------------------------------------------


@pytest.fixture
def flower_off_loopback(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = _free_port()
    secret = tmp_path / "flower_basic_auth"
    secret.write_text("ops:a-long-random-password\n")
    env = {
        **service_env,
        "PATH": f"{BIN}{os.pathsep}{service_env.get('PATH', '/usr/bin:/bin')}",
        "FLOWER_ADDRESS": "0.0.0.0",
        "FLOWER_PORT": str(port),
        "FLOWER_BASIC_AUTH_FILE": str(secret),
    }
    env.pop("FLOWER_BASIC_AUTH", None)
    log = tmp_path / "flower.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["/bin/sh", "deploy/flower.sh"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, port, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_flower_starts_off_loopback_with_a_password_of_its_own(
    flower_off_loopback: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, log = flower_off_loopback
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            if requests.get(url + "/healthcheck", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("Flower did not answer:\n" + log.read_text(errors="replace"))
    assert requests.get(url + "/", timeout=10).status_code == 401
    assert requests.get(url + "/", auth=("admin", "heimdall"), timeout=10).status_code == 401
    ok = requests.get(url + "/", auth=("ops", "a-long-random-password"), timeout=10)
    assert ok.status_code == 200
