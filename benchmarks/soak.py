"""Soak: Redis memory while the service answers many distinct predictions.

``python -m benchmarks.soak [--requests 10000] [--clients 8] [--out FILE]``

Brings up an isolated stack (:func:`benchmarks.stack.spawn_stack`) with the
prediction cache turned off, so every request is computed and what is left in
Redis is the service's own state: claim-check payloads, job records, results,
heartbeats. Sends ``--requests`` distinct predictions (one simulated scene,
its first sample nudged per request so every digest differs) from
``--clients`` threads, samples Redis's ``used_memory`` and key counts once a
second, prints a summary and writes a JSON report. Memory is flat when the
last quarter of the run holds no more than the first: payloads are deleted
when their task is done and answered jobs expire after
``HEIMDALL_ANSWERED_JOB_TTL_S``. (The cache, in production its own Redis under
``maxmemory``, is bounded by its eviction policy, not measured here.)
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis
import requests

from benchmarks.report import environment, write_report
from benchmarks.stack import spawn_stack
from benchmarks.workload import simulated_request


def distinct_body(base: dict[str, Any], index: int) -> bytes:
    """``base`` with its first IQ sample nudged by ``index``: another digest, the same scene."""
    body = copy.deepcopy(base)
    first = body["receivers"][0]
    iq = np.frombuffer(base64.b64decode(first["iq"]), dtype=np.complex64).copy()
    iq[0] += np.complex64(1e-6 * (index + 1))
    first["iq"] = base64.b64encode(iq.tobytes()).decode("ascii")
    return json.dumps(body).encode()


def sample_memory(client: redis.Redis) -> dict[str, Any]:
    """``used_memory`` (bytes) and the key count of each database."""
    info = client.info()
    keys = {name: value["keys"] for name, value in info.items() if name.startswith("db")}
    return {"t": time.time(), "used_memory": int(info["used_memory"]), "keys": keys}


def run(n_requests: int, clients: int) -> dict[str, Any]:
    """Run the soak on a fresh stack; the report."""
    base = simulated_request(20_261_123, 4096, "base64")
    base.pop("truth", None)
    extra = {"HEIMDALL_CACHE_TTL_S": "0", "HEIMDALL_PREDICT_TIMEOUT_S": "30"}
    with spawn_stack(extra_env=extra) as stack:
        client = redis.Redis(port=stack.redis_port)
        samples: list[dict[str, Any]] = []
        done = threading.Event()

        def sampler() -> None:
            while not done.is_set():
                samples.append(sample_memory(client))
                done.wait(1.0)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        session = requests.Session()
        url = f"{stack.base_url}/api/v1/predict"
        headers = {"content-type": "application/json"}

        def send(i: int) -> int:
            return session.post(url, data=distinct_body(base, i), headers=headers).status_code

        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(send, range(n_requests)))
        elapsed = time.monotonic() - started
        done.set()
        thread.join()
        samples.append(sample_memory(client))

    memory = [s["used_memory"] for s in samples]
    quarter = max(1, len(memory) // 4)
    first, last = max(memory[:quarter]), max(memory[-quarter:])
    return {
        "benchmark": "soak",
        "environment": environment(),
        "requests": n_requests,
        "clients": clients,
        "elapsed_s": round(elapsed, 1),
        "throughput_rps": round(n_requests / elapsed, 1),
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "used_memory_mb": {
            "min": round(min(memory) / 2**20, 1),
            "max": round(max(memory) / 2**20, 1),
            "first_quarter_max": round(first / 2**20, 1),
            "last_quarter_max": round(last / 2**20, 1),
            "end": round(memory[-1] / 2**20, 1),
        },
        "flat": last <= first * 1.10 + 8 * 2**20,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args.requests, args.clients)
    memory = report["used_memory_mb"]
    print(
        f"soak: {report['requests']} distinct predictions in {report['elapsed_s']} s "
        f"({report['throughput_rps']} req/s), statuses {report['status_counts']}; "
        f"Redis used_memory MB: min {memory['min']} max {memory['max']} "
        f"first-quarter max {memory['first_quarter_max']} "
        f"last-quarter max {memory['last_quarter_max']} end {memory['end']}; "
        f"flat: {report['flat']}"
    )
    out = args.out or Path("benchmarks/results") / f"soak-{time.strftime('%Y-%m-%d')}.json"
    print(f"report: {write_report(out, report)}")
    return 0 if report["flat"] and set(report["status_counts"]) == {"200"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
