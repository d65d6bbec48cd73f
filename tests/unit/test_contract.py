"""The API <-> worker contract: one Celery configuration, one set of names and types.

Both ends must build the same Celery configuration from the same settings,
spell each message field the way :mod:`heimdall.contract` declares it, and
build the batch document with the one builder; a field renamed on one side
fails here (and in mypy, which the last tests run on purpose-broken code).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any, get_type_hints

import pytest
from celery import Celery

import celeryconfig
import tasks
from app.api import batch_document as api_batch_document
from app.dispatch import JobRecord, make_celery
from heimdall import batch, contract
from heimdall.config import Settings
from heimdall.errors import UnknownStation
from heimdall.heartbeats import CHILD_FIELDS, parse_heartbeat
from tasks import jobs


@pytest.fixture(scope="module")
def settings() -> Settings:
    """Settings with every value the Celery configuration reads set away from its default."""
    return Settings(_env_file=None).model_copy(  # type: ignore[call-arg]
        update={
            "redis_url": "redis://127.0.0.1:6390/2",
            "broker_url": "redis://127.0.0.1:6390/3",
            "result_backend": "redis://127.0.0.1:6390/4",
            "task_time_limit_s": 12.0,
            "result_expires_s": 1234,
        }
    )


def _conf(app: Celery, keys: Any) -> dict[str, Any]:
    return {key: app.conf[key] for key in keys}


# -- one Celery configuration --------------------------------------------------------------


def test_api_and_worker_build_the_same_celery_config(settings: Settings) -> None:
    shared = celeryconfig.celery_config(settings)
    worker = celeryconfig.make_app("test-worker", settings, worker=True)
    api = make_celery(settings)

    assert _conf(worker, shared) == _conf(api, shared) == shared
    assert shared["broker_url"] == settings.broker_url
    assert shared["result_backend"] == settings.result_backend
    assert shared["broker_transport_options"]["visibility_timeout"] == 34
    assert shared["result_expires"] == 1234
    # The settings win over Celery's environment variables at both ends.
    assert worker.backend_cls == api.backend_cls == settings.result_backend
    assert worker.conf.broker_write_url == api.conf.broker_read_url == settings.broker_url
    # Each side adds its own options and nothing else.
    assert _conf(worker, celeryconfig.worker_options()) == celeryconfig.worker_options()
    assert _conf(api, celeryconfig.client_options()) == celeryconfig.client_options()
    assert api.conf.result_backend_always_retry is False


def test_the_worker_and_the_cli_use_the_shared_config() -> None:
    from heimdall.cli import _celery_app
    from heimdall.config import get_settings

    # The worker's app was configured when tasks was first imported, maybe under
    # other settings than this test's (an earlier test's environment).
    worker_shared = celeryconfig.celery_config(tasks.settings)
    shared = celeryconfig.celery_config(get_settings())
    cli = _celery_app()

    assert _conf(tasks.app, worker_shared) == worker_shared
    assert _conf(cli, shared) == shared
    assert tasks.app.conf.result_backend_always_retry is True


def test_config_from_object_reads_the_same_config() -> None:
    """``config_from_object("celeryconfig")`` (Flower, a benchmark client) still works."""
    from heimdall.config import get_settings

    shared = celeryconfig.celery_config(get_settings())
    app = Celery("by-module", set_as_current=False)
    app.config_from_object("celeryconfig")

    assert _conf(app, shared) == shared
    assert "task_annotations" in dir(celeryconfig)
    with pytest.raises(AttributeError):
        _ = celeryconfig.no_such_setting


def test_each_task_policy_is_declared_once_and_applied() -> None:

    policy = celeryconfig.task_policy(tasks.settings)
    registered = {name for name in tasks.app.tasks if name.startswith("heimdall.")}

    assert registered >= {contract.PREDICT_TASK, contract.CHUNK_TASK, contract.COLLECT_TASK}
    assert registered <= policy.keys(), "every task of ours has a declared policy"
    for name in registered:
        task = tasks.app.tasks[name]
        assert {attr: getattr(task, attr) for attr in policy[name]} == policy[name], name
    assert (
        policy[contract.PREDICT_TASK]["soft_time_limit"]
        < policy[contract.PREDICT_TASK]["time_limit"]
    )
    assert policy[contract.SHADOW_TASK]["ignore_result"] is True


# -- names and types -----------------------------------------------------------------------


def _keys(typed_dict: type) -> set[str]:
    return set(get_type_hints(typed_dict))


def test_job_message_fields_are_the_named_ones() -> None:
    assert _keys(contract.JobMessage) == {
        contract.MSG_PAYLOAD_KEY,
        contract.MSG_PAYLOAD_B64,
        contract.MSG_REQUEST_ID,
        contract.MSG_VERSION,
        contract.MSG_ALIAS,
    }
    assert contract.JobMessage.__optional_keys__ == {contract.MSG_VERSION, contract.MSG_ALIAS}


def test_worker_items_are_prediction_items() -> None:
    ok = jobs.ok_item({"position": {"latitude": 45.0}})
    error = jobs.error_item(UnknownStation("no station 'x'", station="x"))

    assert set(ok) == contract.OkItem.__required_keys__
    assert set(error) == contract.ErrorItem.__required_keys__
    assert _keys(contract.OkItem) - _keys(contract.ErrorItem) == {"result"}


def test_job_record_reads_the_named_fields() -> None:
    outcome = jobs.ok_item({"position": {"latitude": 45.0}})
    stored = {
        contract.JOB_KIND.encode(): b"predict",
        contract.JOB_CREATED_AT.encode(): b"1700000000.5",
        contract.JOB_REQUEST_ID.encode(): b"req-1",
        contract.JOB_DIGESTS.encode(): json.dumps({"0": "ab" * 32}).encode(),
        contract.JOB_OUTCOME.encode(): json.dumps(outcome).encode(),
        contract.JOB_FINISHED_AT.encode(): b"1700000001.25",
    }

    record = JobRecord.from_hash("job-1", stored)

    assert record == JobRecord(
        job_id="job-1",
        kind="predict",
        created_at=1700000000.5,
        request_id="req-1",
        digests={"0": "ab" * 32},
        outcome=outcome,
        finished_at=1700000001.25,
    )
    finished = record.finished()
    assert finished is not None and finished.value == outcome


def test_heartbeat_parser_keeps_every_declared_field() -> None:
    identity: contract.IdentityRecord = {"name": "m", "version": "3", "alias": "champion"}
    written: contract.HeartbeatRecord = {
        "state": "loaded",
        "model": identity,
        "error": None,
        "source": "registry",
        "loaded_at": 1700000000.0,
        "at": 1700000001.0,
        "models": [identity],
        "errors": {"challenger": "not registered"},
    }

    assert set(written) == _keys(contract.HeartbeatRecord)
    assert parse_heartbeat(json.dumps(written)) == written
    assert set(CHILD_FIELDS) <= _keys(contract.HeartbeatRecord)
    older = {k: v for k, v in written.items() if k not in ("models", "errors")}
    assert parse_heartbeat(json.dumps(older)) == older
    for junk in ("[1, 2]", "not json", '{"at": 1.0}', '{"state": "loaded", "at": "x"}'):
        assert parse_heartbeat(junk) is None, junk


# -- the batch document --------------------------------------------------------------------


def _ok(latitude: float, cached: bool | None = None) -> contract.PredictionItem:
    item: contract.OkItem = {"status": "ok", "result": {"position": {"latitude": latitude}}}
    if cached is not None:
        item["cached"] = cached
    return item


PROBLEM = UnknownStation("station 'atlantis' is not in the network", station="atlantis")


def test_worker_and_api_build_one_document() -> None:
    """The worker assembles it, the API serves it: one shape, whoever built it last."""
    meta: contract.BatchMeta = {
        "total": 5,
        "chunks": [[0, 3], [4]],
        "answered": {"1": _ok(1.0, cached=True), "2": jobs.error_item(PROBLEM)},
        "request_id": "req-b",
        "started_at": 1700000000.0,
    }
    chunk_results = [[_ok(0.0), _ok(3.0)], [jobs.error_item(PROBLEM)]]

    worker_doc = jobs.assemble_batch(chunk_results, meta)
    served = api_batch_document(worker_doc, job_id="job-b", request_id="req-b", elapsed_ms=12.34567)

    assert set(worker_doc) == set(served) == _keys(contract.BatchDocument)
    assert served["items"] == worker_doc["items"]
    assert [it["index"] for it in served["items"]] == [0, 1, 2, 3, 4]
    assert [it["status"] for it in served["items"]] == ["ok", "ok", "error", "ok", "error"]
    assert [it["cached"] for it in served["items"]] == [False, True, False, False, False]
    assert served["items"][2]["problem"] == PROBLEM.to_problem()
    assert served["items"][3]["result"] == {"position": {"latitude": 3.0}}
    assert served["counts"] == {"total": 5, "succeeded": 3, "failed": 2, "cached": 1}
    assert (served["job_id"], served["request_id"], served["elapsed_ms"]) == (
        "job-b",
        "req-b",
        12.346,
    )
    assert worker_doc["job_id"] is None and worker_doc["elapsed_ms"] is None
    for item in served["items"]:
        assert set(item) <= _keys(contract.BatchItem)


def test_api_answered_items_make_the_same_document() -> None:
    """A fully cached batch (no worker involved) has the document a worker would build."""
    answered = {"0": _ok(0.0, cached=True), "1": _ok(1.0, cached=True)}
    local = {"items": [{"index": int(i), **item} for i, item in answered.items()]}

    served = api_batch_document(local, job_id=None, request_id="r", elapsed_ms=None)
    assembled = batch.assemble([], {"total": 2, "chunks": [], "answered": answered})

    assert served["items"] == assembled["items"]
    assert (
        served["counts"]
        == assembled["counts"]
        == {
            "total": 2,
            "succeeded": 2,
            "failed": 0,
            "cached": 2,
        }
    )


def test_missing_answers_are_503_items() -> None:
    meta: contract.BatchMeta = {"total": 3, "chunks": [[0, 1], [2]], "answered": {}}

    document = batch.assemble([[_ok(0.0)]], meta)

    assert [it["status"] for it in document["items"]] == ["ok", "error", "error"]
    assert {it["problem"]["status"] for it in document["items"][1:]} == {503}
    served = api_batch_document({"items": [_ok(0.0), 7]}, job_id="j", request_id=None, elapsed_ms=1)
    assert served["items"][1]["problem"]["status"] == 503


def test_an_old_worker_document_is_served_the_same() -> None:
    """A document from before the shapes were merged (top-level counts) still reads."""
    old = {
        "total": 2,
        "succeeded": 1,
        "failed": 1,
        "cached": 0,
        "items": [{"index": 1, **jobs.error_item(PROBLEM)}, {"index": 0, **_ok(0.0)}],
        "request_id": "r",
    }

    served = api_batch_document(old, job_id="j", request_id="r", elapsed_ms=None)

    assert [it["index"] for it in served["items"]] == [0, 1]
    assert served["counts"] == {"total": 2, "succeeded": 1, "failed": 1, "cached": 0}


# -- a rename is caught --------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        # A job message with a renamed field.
        'job: JobMessage = {"payload": None, "payload_b64": "AA==", "request_id": "r"}',
        # A heartbeat record without its time.
        'hb: HeartbeatRecord = {"state": "loaded", "model": None, "error": None,'
        ' "source": None, "loaded_at": None}',
        # A batch document that lost its counts' name.
        'doc: BatchDocument = {"items": [], "count": {}, "elapsed_ms": None,'
        ' "request_id": None, "job_id": None}',
        # Reading a field that the contract does not declare.
        "def f(item: OkItem) -> object:\n    return item['results']",
    ],
    ids=["job-message", "heartbeat", "batch-document", "item-read"],
)
def test_mypy_catches_a_renamed_field(code: str) -> None:
    api = pytest.importorskip("mypy.api")
    source = "from heimdall.contract import *  # noqa\n" + textwrap.dedent(code) + "\n"
    stdout, _, status = api.run(
        ["--no-incremental", "--cache-dir=/dev/null", "--config-file=", "-c", source]
    )
    assert status == 1 and "error:" in stdout, stdout


def test_mypy_accepts_the_declared_fields() -> None:
    api = pytest.importorskip("mypy.api")
    source = textwrap.dedent(
        """
        from heimdall.contract import JobMessage, OkItem
        job: JobMessage = {"payload_key": None, "payload_b64": "AA==", "request_id": "r"}
        def f(item: OkItem) -> object:
            return item["result"]
        """
    )
    stdout, _, status = api.run(
        ["--no-incremental", "--cache-dir=/dev/null", "--config-file=", "-c", source]
    )
    assert status == 0, stdout
