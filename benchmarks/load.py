"""Closed-loop HTTP load against ``POST /api/v1/predict``.

``python -m benchmarks.load [--url URL | --spawn] [--requests N] [--concurrency C]
[--samples S] [--encoding base64|pairs] [--out benchmarks/results/load.json]``

``C`` threads, each with its own keep-alive ``requests.Session``, send ``N``
requests in total, each thread sending its next request as soon as the previous
one is answered (closed loop: the offered load adapts to the service, so the
run is bounded and cannot pile up a queue). Two passes:

* ``distinct``: ``N`` different simulated scenes (seeds ``seed .. seed+N-1``),
  so the cache cannot answer: API + broker + worker inference.
* ``repeated``: the same ``N`` bodies again: every one should be a cache hit.

Request bodies are built and serialized before the clock starts. Only
127.0.0.1 / localhost targets are accepted. Without ``--url`` an isolated stack
is spawned (:mod:`benchmarks.stack`). Prints and writes throughput, latency
percentiles, status counts, cache hits and the mean server-side
``inference_time_ms``; never asserts on timing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from benchmarks.report import environment, load_average, summarize_ms, write_report
from benchmarks.workload import ENCODINGS, request_bytes

PREDICT_PATH = "/api/v1/predict"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
REQUEST_TIMEOUT_S = 60.0
DEFAULT_OUT = Path("benchmarks/results/load.json")


def check_local_url(url: str) -> str:
    """The URL without a trailing slash; ValueError unless it is http(s) on this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http:// or https:// URLs")
    if parts.hostname not in LOCAL_HOSTS:
        raise ValueError(
            f"{url!r}: refusing to load a host other than 127.0.0.1/localhost "
            f"(got {parts.hostname!r})"
        )
    return url.rstrip("/")


@dataclass(frozen=True)
class Sample:
    """One request's outcome."""

    latency_ms: float
    status: str
    """HTTP status code as text, or the exception's class name when none came back."""
    cached: bool | None
    inference_time_ms: float | None


def _send(http: requests.Session, url: str, body: bytes) -> Sample:
    started = time.perf_counter()
    try:
        response = http.post(
            url,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT_S,
        )
        content = response.content  # read the whole body inside the timing
    except requests.RequestException as exc:
        return Sample((time.perf_counter() - started) * 1000.0, type(exc).__name__, None, None)
    latency_ms = (time.perf_counter() - started) * 1000.0
    cached: bool | None = None
    inference: float | None = None
    if response.status_code == 200:
        try:
            doc = json.loads(content)
            cached = bool(doc.get("cached"))
            value = doc.get("inference_time_ms")
            inference = float(value) if isinstance(value, int | float) else None
        except ValueError:
            pass
    return Sample(latency_ms, str(response.status_code), cached, inference)


def run_pass(url: str, bodies: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once with ``concurrency`` closed-loop threads; the pass summary."""
    samples: list[Sample | None] = [None] * len(bodies)
    next_index = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal next_index
        with requests.Session() as http:
            while True:
                with lock:
                    index = next_index
                    next_index += 1
                if index >= len(bodies):
                    return
                samples[index] = _send(http, url, bodies[index])

    threads = [
        threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(concurrency)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    done = [s for s in samples if s is not None]
    return summarize_pass(done, wall_s, concurrency)


def summarize_pass(samples: Sequence[Sample], wall_s: float, concurrency: int) -> dict[str, Any]:
    """Throughput, latency percentiles, status counts and cache/inference figures of a pass."""
    ok = [s for s in samples if s.status == "200"]
    uncached = [s.inference_time_ms for s in ok if s.cached is False and s.inference_time_ms]
    statuses = Counter(s.status for s in samples)
    return {
        "requests": len(samples),
        "concurrency": concurrency,
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(samples) / wall_s, 2) if wall_s > 0 else None,
        "latency_ms": summarize_ms([s.latency_ms for s in samples]),
        "latency_ms_200": summarize_ms([s.latency_ms for s in ok]),
        "status_counts": dict(sorted(statuses.items())),
        "cache_hits": sum(1 for s in ok if s.cached is True),
        "cache_misses": sum(1 for s in ok if s.cached is False),
        "mean_inference_time_ms": (round(sum(uncached) / len(uncached), 3) if uncached else None),
    }


def build_bodies(seed: int, count: int, samples: int, encoding: str) -> list[bytes]:
    """``count`` distinct serialized request bodies, seeds ``seed .. seed+count-1``."""
    return [request_bytes(seed + i, samples, encoding) for i in range(count)]


def run_load(
    url: str,
    *,
    requests_n: int,
    concurrency: int,
    samples: int,
    encoding: str,
    seed: int,
) -> dict[str, Any]:
    """Warm up, then the ``distinct`` and ``repeated`` passes against ``url``; the report."""
    url = check_local_url(url)
    target = url + PREDICT_PATH
    with requests.Session() as http:
        ready = http.get(url + "/ready", timeout=10)
    ready_body = ready.json() if ready.headers.get("Content-Type", "").endswith("json") else {}

    built = time.perf_counter()
    # Warm-up bodies use seeds past the measured ones: never cached for the passes.
    warmup = build_bodies(seed + requests_n, concurrency, samples, encoding)
    bodies = build_bodies(seed, requests_n, samples, encoding)
    build_s = time.perf_counter() - built
    body_bytes = sum(len(b) for b in bodies) / max(1, len(bodies))

    load_before = load_average()
    warm = run_pass(target, warmup, concurrency)
    distinct = run_pass(target, bodies, concurrency)
    repeated = run_pass(target, bodies, concurrency)
    return {
        "benchmark": "load",
        "target": target,
        "config": {
            "requests": requests_n,
            "concurrency": concurrency,
            "samples_per_station": samples,
            "encoding": encoding,
            "seed": seed,
            "mean_body_bytes": round(body_bytes),
            "body_build_s": round(build_s, 3),
            "warmup_requests": len(warmup),
        },
        "service": {
            "ready_status": ready.status_code,
            "model_versions": ready_body.get("model_versions"),
            "loaded_children": ready_body.get("loaded_children"),
        },
        "environment": {
            **environment(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "passes": {"warmup": warm, "distinct": distinct, "repeated": repeated},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a short human-readable table."""
    cfg, env = report["config"], report["environment"]
    lines = [
        f"target {report['target']}  requests {cfg['requests']}  concurrency "
        f"{cfg['concurrency']}  samples {cfg['samples_per_station']}  encoding "
        f"{cfg['encoding']}  body {cfg['mean_body_bytes'] / 1024:.0f} KiB",
        f"machine: {env['cores']} cores, load {env['load_average_before']} -> "
        f"{env['load_average_after']}, python {env['python']}, "
        f"onnxruntime {env['packages'].get('onnxruntime')}, "
        f"celery {env['packages'].get('celery')}",
        f"{'pass':<9} {'rps':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'hits':>5} {'infer ms':>8}  statuses",
    ]
    for name in ("distinct", "repeated"):
        p = report["passes"][name]
        lat = p["latency_ms"]
        infer = p["mean_inference_time_ms"]
        lines.append(
            f"{name:<9} {p['throughput_rps']:>7} {lat['p50']:>8} {lat['p90']:>8} "
            f"{lat['p99']:>8} {lat['max']:>8} {p['cache_hits']:>5} "
            f"{infer if infer is not None else '-':>8}  {p['status_counts']}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Closed-loop load test of POST /api/v1/predict (localhost only).",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--spawn", action="store_true", help="spawn an isolated stack (default without --url)"
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per pass")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--samples", type=int, default=4096, help="IQ samples per station")
    parser.add_argument("--encoding", choices=ENCODINGS, default="base64")
    parser.add_argument(
        "--seed", type=int, default=None, help="first scene seed (default: random per run)"
    )
    parser.add_argument(
        "--worker-concurrency", type=int, default=2, help="prefork children (--spawn only)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.load``."""
    args = _parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        print("--requests and --concurrency must be at least 1", file=sys.stderr)
        return 2
    if args.url:
        try:
            check_local_url(args.url)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # A random first seed per run: a long-running service's cache never holds
    # the "distinct" pass from an earlier run.
    seed = args.seed if args.seed is not None else random.randrange(1_000_000, 2**31 - 10**6)
    options = {
        "requests_n": args.requests,
        "concurrency": args.concurrency,
        "samples": args.samples,
        "encoding": args.encoding,
        "seed": seed,
    }
    if args.url:
        try:
            report = run_load(args.url, **options)
        except requests.RequestException as exc:
            print(f"error: {args.url} does not answer: {exc}", file=sys.stderr)
            return 1
        report["spawned_stack"] = None
    else:
        from benchmarks.stack import spawn_stack

        with spawn_stack(worker_concurrency=args.worker_concurrency) as stack:
            report = run_load(stack.base_url, **options)
            report["spawned_stack"] = {
                "worker_concurrency": stack.worker_concurrency,
                "api_workers": stack.api_workers,
                "api_threads": stack.api_threads,
                "model_versions": stack.ready.get("model_versions"),
                "model": stack.model,
            }
    print(format_report(report))
    path = write_report(args.out, report)
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
