"""The workers' heartbeat records in the state Redis, read by ``/ready`` and the CLI.

Each pool child rewrites ``heimdall:workers:{hostname}`` field ``{pid}`` every
``heartbeat_interval_s`` (tasks/model.py); a record older than
``heartbeat_timeout_s`` is a process that is gone.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from heimdall import contract


def live_workers(client: redis.Redis, timeout_s: float) -> list[dict[str, Any]]:
    """Workers with at least one process whose heartbeat is younger than ``timeout_s``.

    Each entry: ``{"hostname", "children": [{"pid", "state", "model", "error",
    "source", "age_s"}]}`` listing only the live processes. Raises on Redis errors.
    """
    now = time.time()
    workers: list[dict[str, Any]] = []
    for key in client.scan_iter(match=contract.WORKERS_PREFIX + "*", count=100):
        name = key.decode() if isinstance(key, bytes) else str(key)
        children = []
        for pid, raw in client.hgetall(name).items():
            try:
                record = json.loads(raw)
                age = now - float(record.get("at", 0.0))
            except (ValueError, TypeError, AttributeError):
                continue
            if age > timeout_s:
                continue
            children.append(
                {
                    "pid": int(pid),
                    "state": record.get("state"),
                    "model": record.get("model"),
                    "error": record.get("error"),
                    "source": record.get("source"),
                    "age_s": round(max(age, 0.0), 3),
                }
            )
        if children:
            children.sort(key=lambda c: c["pid"])
            workers.append(
                {"hostname": name.removeprefix(contract.WORKERS_PREFIX), "children": children}
            )
    workers.sort(key=lambda w: str(w["hostname"]))
    return workers
