"""The workers' heartbeat records in the state Redis, read by ``/ready`` and the CLI.

Each pool child rewrites ``heimdall:workers:{hostname}`` field ``{pid}`` every
``heartbeat_interval_s`` (tasks/model.py) with a
:class:`~heimdall.contract.HeartbeatRecord`; a record older than
``heartbeat_timeout_s`` is a process that is gone.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from heimdall import contract
from heimdall.contract import HeartbeatRecord

CHILD_FIELDS = ("state", "model", "error", "source", "models", "errors")
"""The fields of a heartbeat record :func:`live_workers` passes on (when the record has them)."""


def parse_heartbeat(raw: bytes | str) -> HeartbeatRecord | None:
    """The record stored in one field of a worker's hash; None when it is not one."""
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("state"), str):
            return None
        record["at"] = float(record.get("at", 0.0))
    except (ValueError, TypeError):
        return None
    heartbeat: HeartbeatRecord = {
        "state": record["state"],
        "model": record.get("model"),
        "error": record.get("error"),
        "source": record.get("source"),
        "loaded_at": record.get("loaded_at"),
        "at": record["at"],
    }
    if "models" in record:
        heartbeat["models"] = record["models"]
    if "errors" in record:
        heartbeat["errors"] = record["errors"]
    return heartbeat


def live_workers(client: redis.Redis, timeout_s: float) -> list[dict[str, Any]]:
    """Workers with at least one process whose heartbeat is younger than ``timeout_s``.

    Each entry: ``{"hostname", "children": [{"pid", "state", "model", "error",
    "source", "age_s"}]}`` listing only the live processes (a child also has
    ``models`` and ``errors`` when its record does). Raises on Redis errors.
    """
    now = time.time()
    workers: list[dict[str, Any]] = []
    for key in client.scan_iter(match=contract.WORKERS_PREFIX + "*", count=100):
        name = key.decode() if isinstance(key, bytes) else str(key)
        children = []
        for pid, raw in client.hgetall(name).items():
            record = parse_heartbeat(raw)
            if record is None or (age := now - record["at"]) > timeout_s:
                continue
            child: dict[str, Any] = {"pid": int(pid)}
            child.update((k, v) for k, v in record.items() if k in CHILD_FIELDS)
            child["age_s"] = round(max(age, 0.0), 3)
            children.append(child)
        if children:
            children.sort(key=lambda c: c["pid"])
            workers.append(
                {"hostname": name.removeprefix(contract.WORKERS_PREFIX), "children": children}
            )
    workers.sort(key=lambda w: str(w["hostname"]))
    return workers
