"""The shared log formats (heimdall/logformat.py) and the worker's task-context filter."""

from __future__ import annotations

import json
import logging

from heimdall.logformat import JsonFormatter, KeyValueFormatter, make_formatter
from tasks.logs import TaskContextFilter, _task_ids


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("heimdall.tasks", logging.INFO, __file__, 1, "task.done", (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_logfmt_line_carries_event_and_extra_fields_in_order() -> None:
    line = KeyValueFormatter().format(_record(task_id="t-1", request_id="r 1", cached=True))

    assert line.startswith("ts=")
    assert " level=INFO logger=heimdall.tasks event=task.done task_id=t-1" in line
    assert line.endswith('request_id="r 1" cached=true')


def test_json_line_is_one_object_with_the_same_fields() -> None:
    line = JsonFormatter().format(_record(task_id="t-1", request_id="r-1", items=3))
    doc = json.loads(line)

    assert "\n" not in line
    assert doc["event"] == "task.done" and doc["level"] == "INFO"
    assert doc["logger"] == "heimdall.tasks"
    assert (doc["task_id"], doc["request_id"], doc["items"]) == ("t-1", "r-1", 3)
    assert doc["ts"].endswith("Z")


def test_make_formatter_follows_the_setting() -> None:
    assert isinstance(make_formatter("json"), JsonFormatter)
    assert isinstance(make_formatter("logfmt"), KeyValueFormatter)


def test_task_context_filter_adds_the_running_task_ids_only_where_missing() -> None:
    token = _task_ids.set({"task_id": "t-9", "request_id": "r-9"})
    try:
        plain = _record()
        own = _record(request_id="mine")
        assert TaskContextFilter().filter(plain) and TaskContextFilter().filter(own)
    finally:
        _task_ids.reset(token)

    assert (plain.task_id, plain.request_id) == ("t-9", "r-9")  # type: ignore[attr-defined]
    assert own.request_id == "mine"  # type: ignore[attr-defined]
    outside = _record()
    TaskContextFilter().filter(outside)
    assert not hasattr(outside, "task_id")
