"""Several versions per worker, fallback, validated reloads, SIGHUP, shadows: real processes.

Each worker here has a registry of its own (its ``HEIMDALL_VAR_DIR``) holding
the shipped model as ``champion`` and a variant (:mod:`heimdall.variants`) as
``challenger``, and a queue of its own on the shared broker, so moving its
aliases never disturbs the session's shared worker.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from heimdall import contract
from heimdall.config import Settings
from heimdall.iq import decode_request
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME, ModelCard, sha256_file
from heimdall.registry import register_model, shipped_model_dir
from heimdall.smoke import distance_m
from heimdall.variants import make_variant, register_variant

pytestmark = pytest.mark.timeout(300)

RESULT_TIMEOUT_S = 60.0
SWITCH_TIMEOUT_S = 150.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Deployment:
    """A worker with its own registry and queue."""

    worker: Any
    settings: Settings
    queue: str
    champion: str
    """Version of the shipped model (alias champion)."""
    challenger: str
    """Version of the variant (alias challenger)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _deploy(
    worker_factory: Callable[..., Any],
    var_dir: Path,
    name: str,
    *,
    fail_at_run: bool = False,
    metrics_port: int | None = None,
) -> Deployment:
    settings = Settings(var_dir=var_dir)
    champion, _ = register_model(settings)
    challenger = register_variant(
        settings, var_dir / "variant", "challenger", fail_at_run=fail_at_run
    )
    assert challenger.version != champion.version
    env = {"HEIMDALL_VAR_DIR": str(var_dir)}
    if metrics_port:
        env.update(HEIMDALL_WORKER_METRICS_PORT=str(metrics_port))
    queue = f"heimdall-{name}"
    worker = worker_factory(f"{name}@%h", env, wait="loaded", queues=queue)
    worker.wait_for(lambda s: _holding(s, {champion.version, challenger.version}))
    return Deployment(worker, settings, queue, champion.version, challenger.version)


def _holding(status: dict[str, Any], versions: set[str], exclude: Collection[int] = ()) -> bool:
    """Every child is loaded, holds exactly ``versions`` and is none of ``exclude``."""
    children = status.get("children") or []
    return bool(children) and all(
        c.get("state") == "loaded"
        and {m["version"] for m in c.get("models") or []} == versions
        and c["pid"] not in exclude
        for c in children
    )


def _champion_is(status: dict[str, Any], version: str, exclude: Collection[int] = ()) -> bool:
    children = status.get("children") or []
    return bool(children) and all(
        c.get("state") == "loaded"
        and (c.get("model") or {}).get("version") == version
        and c["pid"] not in exclude
        for c in children
    )


@pytest.fixture(scope="module")
def state_redis(service_env: dict[str, str]) -> redis.Redis:
    """Client of the state Redis (payloads, scored and shadow records)."""
    return redis.Redis.from_url(service_env["HEIMDALL_REDIS_URL"])


@pytest.fixture(scope="module")
def make_job(
    state_redis: redis.Redis, request_factory: Callable[..., dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
    """``make_job(seed, version=None, alias=None, inline=False)``: a job as the API sends it."""
    card = ModelCard.load(shipped_model_dir() / CARD_FILENAME)

    def make(
        seed: int, version: str | None = None, alias: str | None = None, inline: bool = False
    ) -> dict[str, Any]:
        body = request_factory(seed)
        decoded = decode_request(body, stations=card.slots, band_mhz=card.band_mhz, min_stations=3)
        blob = decoded.to_bytes()
        job: dict[str, Any] = {
            "payload_key": None,
            "payload_b64": None,
            "request_id": f"req-{seed}-{uuid.uuid4().hex[:8]}",
        }
        if inline:
            job["payload_b64"] = base64.b64encode(blob).decode("ascii")
        else:
            job["payload_key"] = contract.payload_key(decoded.digest())
            state_redis.set(job["payload_key"], blob, ex=600)
        if version is not None:
            job[contract.MSG_VERSION] = version
        if alias is not None:
            job[contract.MSG_ALIAS] = alias
        return job

    return make


@pytest.fixture(scope="module")
def deployment(
    worker_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """A worker serving the shipped model as champion and a variant as challenger."""
    deployed = _deploy(worker_factory, tmp_path_factory.mktemp("lifecycle-var"), "lifecycle")
    yield deployed
    deployed.worker.stop()


def _predict(client: Celery, deployed: Deployment, job: dict[str, Any]) -> dict[str, Any]:
    return client.send_task(contract.PREDICT_TASK, args=[job], queue=deployed.queue).get(
        timeout=RESULT_TIMEOUT_S
    )


def _reload(deployed: Deployment) -> dict[str, Any]:
    reply = deployed.worker.broadcast(contract.RELOAD_COMMAND, {}, timeout=150)
    assert reply is not None, f"no reply to the reload:\n{deployed.worker.log()}"
    return reply


def _set_alias(deployed: Deployment, alias: str, version: str) -> None:
    # The registry's own client: what `heimdall model promote` does.
    from mlflow import MlflowClient

    uri = deployed.settings.tracking_uri
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        deployed.settings.model_name, alias, version
    )


def _pids(deployed: Deployment) -> set[int]:
    status = deployed.worker.status(timeout=10) or {}
    return {c["pid"] for c in status.get("children", [])}


def _restore(deployed: Deployment) -> None:
    """Champion back on the shipped model, every child serving both versions again."""
    _set_alias(deployed, "champion", deployed.champion)
    _set_alias(deployed, "challenger", deployed.challenger)
    assert _reload(deployed)["ok"] is True
    deployed.worker.wait_for(
        lambda s: (
            _champion_is(s, deployed.champion)
            and _holding(s, {deployed.champion, deployed.challenger})
        ),
        timeout=SWITCH_TIMEOUT_S,
    )


# -- (a) several versions, each job answered by its own ----------------------------


def test_each_version_answers_its_own_jobs(
    deployment: Deployment,
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
    state_redis: redis.Redis,
) -> None:
    status = deployment.worker.status(timeout=10)
    assert {m["version"] for m in status["models"]} == {
        deployment.champion,
        deployment.challenger,
    }
    for child in status["children"]:
        assert {m["alias"] for m in child["models"]} == {"champion", "challenger"}
        assert child["errors"] == {}

    plain = celery_client.send_task(
        contract.PREDICT_TASK, args=[make_job(101)], queue=deployment.queue
    )
    by_version = _predict(
        celery_client, deployment, make_job(101, deployment.challenger, "challenger")
    )
    by_alias = _predict(celery_client, deployment, make_job(101, "no-such-version", "challenger"))
    champion = plain.get(timeout=RESULT_TIMEOUT_S)

    assert champion["status"] == by_version["status"] == by_alias["status"] == "ok"
    assert champion["result"]["model"]["version"] == deployment.champion
    assert champion["result"]["model"]["alias"] == "champion"
    for answer in (by_version, by_alias):
        assert answer["result"]["model"] == {
            "name": "heimdall-localizer",
            "version": deployment.challenger,
            "alias": "challenger",
        }
        assert answer["result"]["fallback"] is False
        assert answer["result"]["fallback_reason"] is None
    assert champion["result"]["fallback"] is False
    # The variant's network answers kilometres away from the champion's.
    a, b = champion["result"]["position"], by_version["result"]["position"]
    assert distance_m(a["latitude"], a["longitude"], b["latitude"], b["longitude"]) > 1_000

    # What ground truth will be scored against, kept for the truth window.
    scored = {
        k.decode(): v.decode()
        for k, v in state_redis.hgetall(contract.scored_key(plain.id)).items()
    }
    assert scored["version"] == deployment.champion
    assert scored["alias"] == "champion"
    assert float(scored["latitude"]) == pytest.approx(a["latitude"])
    assert float(scored["longitude"]) == pytest.approx(a["longitude"])
    covariance = json.loads(scored["covariance_m2"])
    sigma_x = champion["result"]["uncertainty"]["sigma_x_m"]
    assert covariance[0][0] == pytest.approx(sigma_x**2)
    assert covariance[0][1] == covariance[1][0]
    drawn = {
        f"{e['confidence']:g}": e["scale_k"] for e in champion["result"]["uncertainty"]["ellipses"]
    }
    assert json.loads(scored["ellipse_k"]) == drawn
    assert scored["fallback"] == "0"
    assert state_redis.ttl(contract.scored_key(plain.id)) > 3600


def test_chunk_mixing_versions_answers_each_item_with_its_version(
    deployment: Deployment, celery_client: Celery, make_job: Callable[..., dict[str, Any]]
) -> None:
    chunk = [
        make_job(110, deployment.challenger, "challenger"),
        make_job(111),
        make_job(112, deployment.challenger, "challenger"),
        make_job(113, deployment.champion, "champion"),
    ]
    answers = celery_client.send_task(
        contract.CHUNK_TASK, args=[chunk], queue=deployment.queue
    ).get(timeout=RESULT_TIMEOUT_S)

    versions = [a["result"]["model"]["version"] for a in answers]
    assert versions == [
        deployment.challenger,
        deployment.champion,
        deployment.challenger,
        deployment.champion,
    ]
    assert all(a["result"]["fallback"] is False for a in answers)


def test_version_not_held_is_answered_by_the_champion(
    deployment: Deployment, celery_client: Celery, make_job: Callable[..., dict[str, Any]]
) -> None:
    answer = _predict(celery_client, deployment, make_job(120, "999", "ghost"))

    assert answer["status"] == "ok"
    assert answer["result"]["model"]["version"] == deployment.champion
    assert answer["result"]["fallback"] is True
    assert "version 999 (ghost) is not loaded" in answer["result"]["fallback_reason"]


# -- (b) a challenger that fails every request ------------------------------------------


def test_failing_challenger_falls_back_to_the_champion_and_is_counted(
    worker_factory: Callable[..., Any],
    tmp_path: Path,
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
    state_redis: redis.Redis,
) -> None:
    port = _free_port()
    deployed = _deploy(
        worker_factory, tmp_path / "var", "broken", fail_at_run=True, metrics_port=port
    )
    try:
        sent = celery_client.send_task(
            contract.PREDICT_TASK,
            args=[make_job(130, deployed.challenger, "challenger")],
            queue=deployed.queue,
        )
        answer = sent.get(timeout=RESULT_TIMEOUT_S)

        assert answer["status"] == "ok", answer
        assert answer["result"]["model"]["version"] == deployed.champion
        assert answer["result"]["model"]["alias"] == "champion"
        assert answer["result"]["fallback"] is True
        reason = answer["result"]["fallback_reason"]
        assert f"version {deployed.challenger} (challenger) failed while predicting" in reason
        assert state_redis.hget(contract.scored_key(sent.id), "fallback") == b"1"

        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            if 'heimdall_worker_fallbacks_total{reason="error"} 1.0' in text:
                break
            time.sleep(0.5)
        assert 'heimdall_worker_fallbacks_total{reason="error"} 1.0' in text

        # A reload's smoke check finds it out: refused, the champion keeps serving.
        reply = _reload(deployed)
        assert reply["ok"] is False
        assert set(reply["errors"]) == {"challenger"}
        assert "refused" in reply["errors"]["challenger"]
        assert reply["model"]["version"] == deployed.champion
    finally:
        deployed.worker.stop()


# -- (c) a reload under a steady stream of tasks ---------------------------------------


def test_reload_under_load_answers_every_task_and_switches_versions(
    deployment: Deployment, celery_client: Celery, make_job: Callable[..., dict[str, Any]]
) -> None:
    answers: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def stream() -> None:
        seed = 2_000
        while not stop.is_set():
            seed += 1
            sent = [
                celery_client.send_task(
                    contract.PREDICT_TASK, args=[make_job(seed * 10 + k)], queue=deployment.queue
                )
                for k in range(3)
            ]
            for result in sent:
                try:
                    answers.append(result.get(timeout=RESULT_TIMEOUT_S * 2))
                except Exception as exc:
                    failures.append(exc)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while len(answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        # Promote the variant and reload while tasks keep coming.
        _set_alias(deployment, "champion", deployment.challenger)
        reply = _reload(deployment)
        assert reply["ok"] is True, reply
        assert reply["model"]["version"] == deployment.challenger
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while time.monotonic() < deadline and not (
            len(answers) >= 6
            and all(
                a.get("result", {}).get("model", {}).get("version") == deployment.challenger
                for a in answers[-3:]
            )
        ):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=RESULT_TIMEOUT_S * 3)
    try:
        assert not failures, failures
        assert all(a["status"] == "ok" for a in answers), [
            a for a in answers if a["status"] != "ok"
        ]
        versions = [a["result"]["model"]["version"] for a in answers]
        assert versions[0] == deployment.champion
        assert versions[-1] == deployment.challenger
        assert set(versions) == {deployment.champion, deployment.challenger}
    finally:
        _restore(deployment)


# -- (d) a corrupted artifact is refused -----------------------------------------------


def _corrupt_copy(deployed: Deployment, name: str, *, consistent_card: bool) -> str:
    """Register a new variant, then corrupt the copy the worker will use: its version."""
    source = make_variant(deployed.settings.var_dir / name, shift_m=(5_000.0, 5_000.0))
    identity, _ = register_model(deployed.settings, source, alias=name)
    local = deployed.settings.var_dir.resolve() / "models" / deployed.settings.model_name
    target = local / identity.version
    target.mkdir(parents=True, exist_ok=True)
    onnx_bytes = (source / MODEL_FILENAME).read_bytes()
    (target / MODEL_FILENAME).write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    card = json.loads((source / CARD_FILENAME).read_text())
    if consistent_card:  # the digest matches the truncated file: only loading it fails
        card["onnx_sha256"] = sha256_file(target / MODEL_FILENAME)
    (target / CARD_FILENAME).write_text(json.dumps(card))
    return identity.version


@pytest.mark.parametrize("consistent_card", [False, True], ids=["wrong-digest", "truncated-onnx"])
def test_reload_to_a_corrupted_artifact_keeps_the_old_version_and_the_cli_fails(
    deployment: Deployment,
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
    consistent_card: bool,
) -> None:
    name = f"corrupt-{int(consistent_card)}"
    version = _corrupt_copy(deployment, name, consistent_card=consistent_card)
    before = _pids(deployment)
    _set_alias(deployment, "champion", version)
    try:
        env = {**deployment.worker.env, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
        done = subprocess.run(
            [
                sys.executable, "-m", "heimdall.cli", "model", "reload",
                "--destination", deployment.worker.hostname, "--timeout", "150",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=200,
        )  # fmt: skip
        assert done.returncode != 0, done.stdout + done.stderr
        lines = [line for line in done.stdout.splitlines() if deployment.worker.hostname in line]
        assert len(lines) == 1, done.stdout
        assert lines[0].startswith("FAILED")
        assert f"still serving heimdall-localizer v{deployment.champion} (champion)" in lines[0]
        assert f"champion: version {version}" in lines[0]
        expected = "does not match the card" if not consistent_card else "cannot serve"
        assert expected in lines[0], lines[0]

        status = deployment.worker.status(timeout=10)
        assert status["model"]["version"] == deployment.champion
        assert {c["pid"] for c in status["children"]} == before
        answer = _predict(celery_client, deployment, make_job(140))
        assert answer["result"]["model"]["version"] == deployment.champion
    finally:
        _set_alias(deployment, "champion", deployment.champion)


# -- (e) SIGHUP ------------------------------------------------------------------------


def test_sighup_reloads_the_served_models(
    deployment: Deployment, celery_client: Celery, make_job: Callable[..., dict[str, Any]]
) -> None:
    before = _pids(deployment)
    main_pid = deployment.worker.pid
    _set_alias(deployment, "champion", deployment.challenger)
    try:
        os.kill(main_pid, signal.SIGHUP)
        deployment.worker.wait_for(
            lambda s: _champion_is(s, deployment.challenger, exclude=before),
            timeout=SWITCH_TIMEOUT_S,
        )
        # Reloaded in place, not re-executed: the same main process.
        assert deployment.worker.pid == main_pid
        assert "Restarting celery worker" not in deployment.worker.log()
        answer = _predict(celery_client, deployment, make_job(150))
        assert answer["result"]["model"]["version"] == deployment.challenger
    finally:
        _restore(deployment)


# -- (f) shadow ------------------------------------------------------------------------


def test_shadow_task_records_its_answer_beside_the_primary(
    deployment: Deployment,
    celery_client: Celery,
    make_job: Callable[..., dict[str, Any]],
    state_redis: redis.Redis,
) -> None:
    primary = contract.new_job_id()
    job = make_job(160, deployment.challenger, "challenger")
    missing = make_job(160, "999", "ghost")
    key = contract.shadow_key(primary)

    for shadow_job in (job, missing):
        celery_client.send_task(
            contract.SHADOW_TASK, args=[shadow_job, primary], queue=deployment.queue
        )
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while state_redis.hlen(key) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)

    records = {k.decode(): json.loads(v) for k, v in state_redis.hgetall(key).items()}
    assert set(records) == {deployment.challenger, "999"}
    answered = records[deployment.challenger]
    assert answered["error"] is None
    assert answered["model"]["version"] == deployment.challenger
    assert set(answered) == {
        "latitude", "longitude", "covariance_m2", "ellipse_k", "model", "error",
        "inference_time_ms",
    }  # fmt: skip
    assert len(answered["covariance_m2"]) == 2
    assert records["999"]["latitude"] is None
    assert "version 999 is not loaded" in records["999"]["error"]
    assert state_redis.ttl(key) > 3600
    # Its payload is deleted once it is done, and no result is stored.
    deadline = time.monotonic() + 30
    while state_redis.exists(job["payload_key"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not state_redis.exists(job["payload_key"])


# -- the choice itself, in process (no worker) ---------------------------------------


def test_served_groups_jobs_by_version_and_names_each_fallback(
    tmp_path: Path, make_job: Callable[..., dict[str, Any]]
) -> None:
    from heimdall.modelcard import ModelIdentity
    from heimdall.runtime import Localizer
    from heimdall.stations import load_network
    from tasks.jobs import Served, predict_jobs

    def localizer(folder: Path, version: str, alias: str) -> Localizer:
        card = ModelCard.load(folder / CARD_FILENAME)
        identity = ModelIdentity("heimdall-localizer", version, alias)
        return Localizer(folder / MODEL_FILENAME, card, load_network(), identity)

    mismatched_dir = make_variant(tmp_path / "mismatched")
    card = json.loads((mismatched_dir / CARD_FILENAME).read_text())
    card["band_mhz"] = [430.0, 440.0]  # a 70 cm model: the 2 m requests do not fit
    (mismatched_dir / CARD_FILENAME).write_text(json.dumps(card))
    champion = localizer(shipped_model_dir(), "1", "champion")
    challenger = localizer(make_variant(tmp_path / "challenger"), "2", "challenger")
    broken = localizer(make_variant(tmp_path / "broken", fail_at_run=True), "3", "broken")
    mismatched = localizer(mismatched_dir, "4", "uhf")
    held = [champion, challenger, broken, mismatched]
    served = Served(
        champion=champion,
        versions={loc.identity.version: loc for loc in held},
        aliases={str(loc.identity.alias): loc for loc in held},
        failed={"ghost": "cannot load model.onnx"},
    )
    jobs = [
        make_job(170, inline=True),
        make_job(171, "2", "challenger", inline=True),
        make_job(172, "3", "broken", inline=True),
        make_job(173, "4", "uhf", inline=True),
        make_job(174, "5", "ghost", inline=True),
        make_job(175, 2, None, inline=True),  # a number is read as its text
    ]
    labels: list[str] = []

    answers = predict_jobs(
        jobs, served, lambda key: None, min_stations=3, on_fallback=labels.append
    )

    results = [a["result"] for a in answers]
    assert [r["model"]["version"] for r in results] == ["1", "2", "1", "1", "1", "2"]
    assert [r["fallback"] for r in results] == [False, False, True, True, True, False]
    assert results[2]["fallback_reason"].startswith("version 3 (broken) failed while predicting (")
    assert "version 4 (uhf) cannot answer it: frequency_mhz" in results[3]["fallback_reason"]
    assert results[4]["fallback_reason"] == (
        "version 5 (ghost) failed to load on this worker: cannot load model.onnx"
    )
    assert sorted(labels) == ["card_mismatch", "error", "not_loaded"]


def test_extra_models_resolve_by_alias_or_explicit_version_and_skip_unknown(
    tmp_path: Path,
) -> None:
    from tasks.model import resolve_extras

    settings = Settings(var_dir=tmp_path / "var")
    champion, _ = register_model(settings)
    challenger = register_variant(settings, tmp_path / "variant", "challenger")
    settings = settings.model_copy(
        update={"extra_models": ["challenger", champion.version, "99", "ghost", "champion"]}
    )

    resolved, skipped, failed = resolve_extras(settings)

    assert {t: r.identity.to_dict() for t, r in resolved.items()} == {
        "challenger": {**challenger.to_dict(), "alias": "challenger"},
        champion.version: {**champion.to_dict(), "alias": champion.version},
    }
    assert set(skipped) == {"99", "ghost"}  # the champion is not resolved twice
    assert "has no version 99" in skipped["99"]
    assert "alias 'ghost'" in skipped["ghost"]
    assert failed == {}
