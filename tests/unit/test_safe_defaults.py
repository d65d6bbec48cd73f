"""Safe defaults that need no running service: settings, bounded problems, the reload
verdict, and the start scripts' refusals (run for real with /bin/sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from heimdall.cli import reload_outcome
from heimdall.config import Settings
from heimdall.errors import (
    MAX_DETAIL_CHARS,
    MAX_QUOTED_CHARS,
    UnknownStation,
    bounded,
    bounded_problem,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
URL_NAMES = ("HEIMDALL_REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("HEIMDALL_", "CELERY_")):
            monkeypatch.delenv(name)
    return monkeypatch


# -- broker and result backend follow HEIMDALL_REDIS_URL ------------------------------------


def test_broker_and_backend_follow_the_redis_url(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HEIMDALL_REDIS_URL", "redis://elsewhere:6380/3")
    settings = Settings()
    assert settings.broker_url == "redis://elsewhere:6380/3"
    assert settings.result_backend == "redis://elsewhere:6380/3"


def test_broker_and_backend_default_to_the_default_redis(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.broker_url == settings.redis_url == settings.result_backend


@pytest.mark.parametrize("empty", ["", None])
def test_set_broker_and_backend_win(clean_env: pytest.MonkeyPatch, empty: str | None) -> None:
    clean_env.setenv("HEIMDALL_REDIS_URL", "redis://cache:6379/2")
    clean_env.setenv("CELERY_BROKER_URL", "redis://queues:6379/0")
    if empty is None:
        clean_env.setenv("HEIMDALL_RESULT_BACKEND", "redis://results:6379/1")
    else:
        clean_env.setenv("CELERY_RESULT_BACKEND", empty)  # empty means "not set"
    settings = Settings()
    assert settings.broker_url == "redis://queues:6379/0"
    expected = "redis://results:6379/1" if empty is None else "redis://cache:6379/2"
    assert settings.result_backend == expected


# -- problem documents never echo a megabyte --------------------------------------------------


def test_bounded_keeps_short_text_and_cuts_long_text() -> None:
    assert bounded("torino", 20) == "torino"
    cut = bounded("x" * 1_000_000, 200)
    assert len(cut) <= 200
    assert cut.startswith("xxx")
    assert "1000000 characters" in cut


def test_a_huge_station_id_is_not_echoed() -> None:
    station = "A" * 1_000_000
    error = UnknownStation(
        f"station {station!r} is not in the model's network",
        field="receivers[0].station",
        station=station,
    )
    problem = error.to_problem()
    assert len(problem["detail"]) <= MAX_DETAIL_CHARS
    assert len(problem["station"]) <= MAX_QUOTED_CHARS
    assert problem["detail"].startswith("station 'AAA")
    assert problem["field"] == "receivers[0].station"
    assert problem["status"] == 422


def test_bounded_problem_bounds_every_string_member() -> None:
    problem = {"type": "urn:x", "status": 502, "detail": "d" * 5000, "field": "f" * 5000}
    body = bounded_problem(problem)
    assert len(body["detail"]) <= MAX_DETAIL_CHARS
    assert len(body["field"]) <= MAX_QUOTED_CHARS
    assert body["status"] == 502 and body["type"] == "urn:x"


# -- heimdall model reload: the verdict -------------------------------------------------------


def _reply(ok: bool, error: str | None = None) -> dict[str, Any]:
    model = {"name": "heimdall-localizer", "version": "3", "alias": "champion"}
    return {"ok": ok, "hostname": "h", "model": model, "error": error}


def test_reload_succeeds_only_when_every_worker_did() -> None:
    status, lines = reload_outcome([{"a@h": _reply(True)}, {"b@h": _reply(True)}])
    assert status == 0
    assert lines == [
        "ok      a@h: now serving heimdall-localizer v3 (champion)",
        "ok      b@h: now serving heimdall-localizer v3 (champion)",
    ]


def test_reload_fails_when_one_worker_failed() -> None:
    replies = [{"a@h": _reply(True)}, {"b@h": _reply(False, "alias 'x' not found")}]
    status, lines = reload_outcome(replies)
    assert status == 1
    assert "FAILED  b@h: alias 'x' not found (still serving heimdall-localizer v3" in lines[1]
    assert lines[-1] == "1 of 2 worker(s) failed to reload"


def test_reload_fails_when_no_worker_replied() -> None:
    status, lines = reload_outcome([])
    assert status == 1
    assert "no worker replied" in lines[0]


# -- deploy/flower.sh and deploy/docker-entrypoint.sh, run for real ---------------------------


def _sh(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(DEPLOY / script), *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "auth",
    [None, "", "admin:heimdall", "ops:a-long-secret,admin:heimdall"],
)
def test_flower_refuses_the_shipped_password_off_loopback(auth: str | None) -> None:
    env = {"FLOWER_ADDRESS": "0.0.0.0"}
    if auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth
    out = _sh("flower.sh", env)
    assert out.returncode == 78, out
    assert "refusing to listen on 0.0.0.0" in out.stderr
    # It names what to do without printing any credential it was given.
    assert "FLOWER_BASIC_AUTH=user:" in out.stderr
    assert "a-long-secret" not in out.stderr


def test_entrypoint_puts_the_password_into_bare_redis_urls(tmp_path: Path) -> None:
    secret = tmp_path / "redis_password"
    secret.write_text("s3cr3t\n")
    env = {
        "REDIS_PASSWORD_FILE": str(secret),
        "HEIMDALL_REDIS_URL": "redis://redis:6379/0",
        "HEIMDALL_CACHE_REDIS_URL": "redis://redis-cache:6379/0",
        "CELERY_BROKER_URL": "redis://:other@redis:6379/0",  # has credentials: untouched
    }
    out = _sh("docker-entrypoint.sh", env, "env")
    assert out.returncode == 0, out
    seen = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert seen["HEIMDALL_REDIS_URL"] == "redis://:s3cr3t@redis:6379/0"
    assert seen["HEIMDALL_CACHE_REDIS_URL"] == "redis://:s3cr3t@redis-cache:6379/0"
    assert seen["CELERY_BROKER_URL"] == "redis://:other@redis:6379/0"
    assert "CELERY_RESULT_BACKEND" not in seen  # unset stays unset (follows the Redis URL)


def test_entrypoint_refuses_a_missing_password_file(tmp_path: Path) -> None:
    out = _sh("docker-entrypoint.sh", {"REDIS_PASSWORD_FILE": str(tmp_path / "nope")}, "true")
    assert out.returncode == 78
    assert "not readable" in out.stderr


# -- compose and Kubernetes keep the Redis password in secrets --------------------------------


def test_compose_redis_servers_have_a_password_and_their_policies() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    state = " ".join(services["redis"]["command"])
    cache = " ".join(services["redis-cache"]["command"])
    for command in (state, cache):
        assert "requirepass" in command and "/run/secrets/redis_password" in command
    assert "--appendonly yes --appendfsync everysec" in state
    assert "--maxmemory 256mb --maxmemory-policy allkeys-lru" in cache
    assert doc["secrets"]["redis_password"]["file"].startswith("./var/")
    env = doc["x-heimdall-env"]
    assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert env["HEIMDALL_CACHE_REDIS_URL"].startswith("redis://redis-cache:")
    # No password in the file itself: every URL is bare, the entrypoint adds it.
    assert all("@" not in value for name, value in env.items() if name.endswith("_URL"))
    for name in ("api", "worker", "flower", "register"):
        assert "redis_password" in services[name]["secrets"], name


def test_k8s_redis_urls_come_from_a_secret() -> None:
    secret = yaml.safe_load((DEPLOY / "k8s" / "redis-auth.secret.example.yaml").read_text())
    assert secret["metadata"]["name"] == "heimdall-redis"
    assert {*URL_NAMES, "HEIMDALL_CACHE_REDIS_URL"} == set(secret["stringData"])
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]
    assert not {*URL_NAMES, "HEIMDALL_CACHE_REDIS_URL"} & set(config)
