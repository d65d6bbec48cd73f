"""The service's log line formats, shared by the API and the worker.

Two renderings of the same fields (``HEIMDALL_LOG_FORMAT``): ``logfmt``
(``ts=... level=... logger=... event=... k=v``, the default) and ``json`` (one
object a line, for a log shipper). The fields are the record's message as
``event`` plus whatever the caller passed in ``extra`` (``request_id``,
``task_id``, ...). No Flask, no Celery: both sides import it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _render(value: Any) -> str:
    text = (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )
    if not text or any(c in text for c in ' "=\n\t'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... event=... k=v ...`` with the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as one ``key=value`` line."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        pairs: list[tuple[str, Any]] = [
            ("ts", f"{ts}.{int(record.msecs):03d}Z"),
            ("level", record.levelname),
            ("logger", record.name),
            ("event", record.getMessage()),
        ]
        pairs.extend((k, v) for k, v in record.__dict__.items() if k not in _RESERVED)
        line = " ".join(f"{k}={_render(v)}" for k, v in pairs)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``event`` and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as one JSON line (values that JSON cannot hold as text)."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update((k, v) for k, v in record.__dict__.items() if k not in _RESERVED)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``HEIMDALL_LOG_FORMAT`` (``logfmt`` or ``json``)."""
    return JsonFormatter() if log_format == "json" else KeyValueFormatter()
