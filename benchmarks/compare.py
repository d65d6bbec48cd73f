"""Side-by-side measurements behind Heimdall's design choices.

``python -m benchmarks.compare [--quick] [--samples S] [--out benchmarks/results/compare.json]``

Three sections, each reporting medians over repeated runs (bounded counts; the
whole script takes well under 3 minutes on 2 cores, ``--quick`` well under 1):

* ``message_forms``: how a request's IQ payload travels to a worker. The same
  decoded request as (1) JSON float pairs, (2) inline base64 of the canonical
  blob, (3) claim-check (blob stored in Redis, only its key in the message):
  ``codec_redis`` = kombu JSON encode + Redis LPUSH/BRPOP + kombu decode + turning
  the payload back into complex64 arrays (plus SET/GET of the blob for the
  claim-check), no Celery; ``celery_transport`` = a full Celery round trip
  (publish, worker consume, result back) of that message through the built-in
  no-op task ``celery.accumulate`` (returns ``None``), no inference;
  ``heimdall_predict`` = the real ``heimdall.predict`` round trip for the two
  forms the task accepts (base64, claim-check), inference included.
* ``batch_vs_single``: 64 items through the HTTP API as one
  ``POST /api/v1/predict/batch`` (a chord of ``heimdall.predict_chunk`` over
  chunks of 16) vs 64 ``POST /api/v1/predict`` calls, sequential and with 4
  client threads; all items distinct, so no cache hit.
* ``onnxruntime``: :class:`heimdall.runtime.Localizer` in this process: per-item
  cost of one ONNX run of batch 1 vs batch 16, and ``intra_op_num_threads`` 1 vs 2.

Prints a summary and writes the JSON report. Never asserts on timing.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import redis
import requests
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads

from benchmarks.load import check_local_url, run_pass
from benchmarks.report import environment, load_average, median, write_report
from benchmarks.stack import Stack, spawn_stack
from benchmarks.workload import decoded_request, request_bytes, shipped_card, simulated_request
from heimdall.config import Settings
from heimdall.iq import DecodedRequest

DEFAULT_OUT = Path("benchmarks/results/compare.json")
PAYLOAD_PREFIX = "heimdall:payload:"
TASK_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Plan:
    """How many repetitions each measurement gets."""

    message_reps: int
    batch_items: int
    batch_reps: int
    single_concurrency: int
    onnx_run_reps: int
    onnx_predict_reps: int

    @classmethod
    def full(cls) -> Plan:
        """Counts for the numbers in the README (about 1-2 minutes on 2 cores)."""
        return cls(
            message_reps=30,
            batch_items=64,
            batch_reps=3,
            single_concurrency=4,
            onnx_run_reps=300,
            onnx_predict_reps=30,
        )

    @classmethod
    def quick(cls) -> Plan:
        """Small counts: checks that everything runs (tests), not for figures."""
        return cls(
            message_reps=4,
            batch_items=16,
            batch_reps=1,
            single_concurrency=4,
            onnx_run_reps=30,
            onnx_predict_reps=4,
        )


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def _timed(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Durations (ms) of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        out.append(_ms(started))
    return out


# -- a. message forms -------------------------------------------------------------------------


def _pairs_of(x: np.ndarray) -> list[list[float]]:
    return np.ascontiguousarray(x, dtype="<c8").view("<f4").reshape(-1, 2).tolist()


def message_forms(request: DecodedRequest) -> dict[str, dict[str, Any]]:
    """The same request as the three messages a worker could be sent.

    ``pairs``: the request's recordings as JSON ``[[I, Q], ...]`` (what a JSON
    client posts); ``base64``: the job with the canonical blob inline
    (``payload_b64``); ``claim_check``: the job with ``payload_key`` only.
    """
    blob = request.to_bytes()
    request_id = "bench-" + uuid.uuid4().hex[:8]
    pairs = {
        "receivers": [{"station": sid, "iq": _pairs_of(x)} for sid, x in request.recordings],
        "sample_rate_hz": request.sample_rate_hz,
        "frequency_mhz": request.frequency_mhz,
        "request_id": request_id,
    }
    inline = {
        "payload_key": None,
        "payload_b64": base64.b64encode(blob).decode("ascii"),
        "request_id": request_id,
    }
    claim = {
        "payload_key": PAYLOAD_PREFIX + request.digest(),
        "payload_b64": None,
        "request_id": request_id,
    }
    return {"pairs": pairs, "base64": inline, "claim_check": claim}


def _to_arrays(form: str, message: dict[str, Any], blob: bytes | None) -> None:
    """What a worker does to get complex64 arrays back from a message."""
    if form == "pairs":
        for receiver in message["receivers"]:
            np.asarray(receiver["iq"], dtype=np.float32).view(np.complex64).ravel()
    elif form == "base64":
        DecodedRequest.from_bytes(base64.b64decode(message["payload_b64"]))
    else:
        assert blob is not None
        DecodedRequest.from_bytes(blob)


def codec_redis(
    client: redis.Redis, request: DecodedRequest, reps: int
) -> dict[str, dict[str, Any]]:
    """Per form: median ms of each step of encode -> Redis list -> decode -> arrays."""
    blob = request.to_bytes()
    queue = "bench:queue:" + uuid.uuid4().hex[:8]
    results: dict[str, dict[str, Any]] = {}
    for form, message in message_forms(request).items():
        steps: dict[str, list[float]] = {
            k: [] for k in ("encode", "claim_set", "push_pop", "decode", "claim_get", "to_array")
        }
        totals: list[float] = []
        size = 0
        for i in range(reps + 2):  # the first 2 are warm-up
            t = time.perf_counter()
            content_type, encoding, data = kombu_dumps(message, serializer="json")
            encode = _ms(t)
            t = time.perf_counter()
            if form == "claim_check":
                client.set(message["payload_key"], blob, ex=600)
            claim_set = _ms(t)
            t = time.perf_counter()
            client.lpush(queue, data)
            popped = client.brpop([queue], timeout=5)
            push_pop = _ms(t)
            assert popped is not None
            t = time.perf_counter()
            received = kombu_loads(popped[1], content_type, encoding)
            decode = _ms(t)
            t = time.perf_counter()
            raw = client.get(message["payload_key"]) if form == "claim_check" else None
            fetched = raw if isinstance(raw, bytes) else None
            claim_get = _ms(t)
            t = time.perf_counter()
            _to_arrays(form, received, fetched)
            to_array = _ms(t)
            size = len(data)
            if i < 2:
                continue
            for key, value in zip(
                steps, (encode, claim_set, push_pop, decode, claim_get, to_array), strict=True
            ):
                steps[key].append(value)
            totals.append(encode + claim_set + push_pop + decode + claim_get + to_array)
        results[form] = {
            "message_bytes": size,
            "redis_payload_bytes": len(blob) if form == "claim_check" else 0,
            "median_total_ms": median(totals),
            "median_step_ms": {k: median(v) for k, v in steps.items()},
        }
    client.delete(queue)
    return results


def celery_transport(
    celery: Any, client: redis.Redis, request: DecodedRequest, reps: int
) -> dict[str, dict[str, Any]]:
    """Per form: median ms of a Celery round trip of the message via ``celery.accumulate``.

    ``celery.accumulate(message, None, index=1)`` is Celery's built-in no-op: it
    returns ``None``, so the result is tiny and the time is the message's
    publish + worker decode + result, no Heimdall code. For the claim-check the
    blob's SET is included (the worker-side GET is not: see ``codec_redis``).
    """
    blob = request.to_bytes()
    results: dict[str, dict[str, Any]] = {}
    for form, message in message_forms(request).items():

        def once(form: str = form, message: dict[str, Any] = message) -> None:
            if form == "claim_check":
                client.set(message["payload_key"], blob, ex=600)
            result = celery.send_task(
                "celery.accumulate", args=[message, None], kwargs={"index": 1}
            )
            result.get(timeout=TASK_TIMEOUT_S, interval=0.005)
            result.forget()

        results[form] = {"median_round_trip_ms": median(_timed(once, reps))}
    return results


def heimdall_predict(
    celery: Any, client: redis.Redis, request: DecodedRequest, reps: int
) -> dict[str, dict[str, Any]]:
    """Median ms of a ``heimdall.predict`` round trip, inline base64 vs claim-check."""
    blob = request.to_bytes()
    forms = message_forms(request)
    results: dict[str, dict[str, Any]] = {}
    for form in ("base64", "claim_check"):
        message = forms[form]
        inference: list[float] = []
        statuses: Counter[str] = Counter()

        def once(
            form: str = form,
            message: dict[str, Any] = message,
            inference: list[float] = inference,
            statuses: Counter[str] = statuses,
        ) -> None:
            if form == "claim_check":
                client.set(message["payload_key"], blob, ex=600)
            result = celery.send_task("heimdall.predict", args=[message])
            item = result.get(timeout=TASK_TIMEOUT_S, interval=0.005)
            result.forget()
            statuses[str(item.get("status"))] += 1
            if item.get("status") == "ok":
                inference.append(float(item["result"]["inference_time_ms"]))

        times = _timed(once, reps)
        results[form] = {
            "median_round_trip_ms": median(times),
            "median_worker_inference_ms": median(inference),
            "item_statuses": dict(statuses),
        }
    return results


def run_message_forms(stack: Stack, plan: Plan, samples: int, seed: int) -> dict[str, Any]:
    """Section a: the three message forms, at three levels."""
    request = decoded_request(seed, samples)
    client = stack.redis_client()
    celery = stack.celery_client()
    try:
        codec = codec_redis(client, request, plan.message_reps)
        transport = celery_transport(celery, client, request, plan.message_reps)
        predict = heimdall_predict(celery, client, request, plan.message_reps)
    finally:
        celery.close()
        client.close()
    return {
        "measures": {
            "codec_redis": "no Celery: kombu JSON encode + Redis LPUSH/BRPOP + kombu decode "
            "+ payload back to complex64 (claim-check adds SET and GET of the blob)",
            "celery_transport": "Celery send_task + result.get of the message through the "
            "built-in no-op celery.accumulate (returns None); claim-check includes the SET",
            "heimdall_predict": "send_task('heimdall.predict') + result.get: transport, payload "
            "decode, features, ONNX, result document; claim-check includes the SET",
        },
        "request": {
            "stations": len(request.stations),
            "samples_per_station": samples,
            "floats": 2 * sum(int(x.size) for _, x in request.recordings),
            "blob_bytes": len(request.to_bytes()),
        },
        "reps": plan.message_reps,
        "codec_redis": codec,
        "celery_transport": transport,
        "heimdall_predict": predict,
    }


# -- b. batch vs single ---------------------------------------------------------------------


def _post_batch(http: requests.Session, base_url: str, body: bytes) -> dict[str, Any]:
    """POST /predict/batch; poll the job when the API answers 202. The batch document."""
    response = http.post(
        base_url + "/api/v1/predict/batch",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=HTTP_TIMEOUT_S,
    )
    if response.status_code == 202:
        location = base_url + response.headers["Location"]
        deadline = time.monotonic() + HTTP_TIMEOUT_S
        while time.monotonic() < deadline:
            job = http.get(location, timeout=10).json()
            if job["status"] in ("succeeded", "failed"):
                return dict(job.get("result") or {"status_code": 202, "job": job})
            time.sleep(0.01)
    if response.status_code != 200:
        return {"status_code": response.status_code, "detail": response.text[:300]}
    return dict(response.json())


def run_batch_vs_single(base_url: str, plan: Plan, samples: int, seed: int) -> dict[str, Any]:
    """Section b: N items as one batch request vs N single requests (distinct items)."""
    n = plan.batch_items
    batch_ms: list[float] = []
    sequential_ms: list[float] = []
    concurrent_ms: list[float] = []
    outcomes: dict[str, Counter[str]] = {k: Counter() for k in ("batch", "seq", "conc")}
    batch_errors: list[str] = []
    next_seed = seed
    with requests.Session() as http:
        for _ in range(plan.batch_reps):
            # Fresh scenes for every measurement: the cache never answers.
            items = [simulated_request(next_seed + i, samples) for i in range(n)]
            body = json.dumps({"items": items}).encode()
            next_seed += n
            started = time.perf_counter()
            document = _post_batch(http, base_url, body)
            batch_ms.append(_ms(started))
            counts = document.get("counts")
            if counts is None:  # not a batch document: a problem, or a job that failed
                counts = {"failed": n}
                batch_errors.append(json.dumps(document)[:300])
            for key in ("succeeded", "failed", "cached"):
                outcomes["batch"][key] += int(counts.get(key, 0))

            singles = [request_bytes(next_seed + i, samples) for i in range(n)]
            next_seed += n
            started = time.perf_counter()
            for single in singles:
                r = http.post(
                    base_url + "/api/v1/predict",
                    data=single,
                    headers={"Content-Type": "application/json"},
                    timeout=HTTP_TIMEOUT_S,
                )
                outcomes["seq"][str(r.status_code)] += 1
                if r.status_code == 200 and r.json().get("cached"):
                    outcomes["seq"]["cached"] += 1
            sequential_ms.append(_ms(started))

            singles = [request_bytes(next_seed + i, samples) for i in range(n)]
            next_seed += n
            summary = run_pass(base_url + "/api/v1/predict", singles, plan.single_concurrency)
            concurrent_ms.append(summary["wall_s"] * 1000.0)
            outcomes["conc"].update(summary["status_counts"])
            outcomes["conc"]["cached"] += summary["cache_hits"]

    def row(times: list[float], outcome: Counter[str]) -> dict[str, Any]:
        wall = median(times)
        return {
            "median_wall_ms": wall,
            "median_ms_per_item": round(wall / n, 3) if wall else None,
            "items_per_s": round(n / (wall / 1000.0), 2) if wall else None,
            "outcomes": dict(outcome),
        }

    return {
        "measures": f"wall time for {n} distinct items through the HTTP API (client-side, "
        "body already serialized)",
        "items": n,
        "samples_per_station": samples,
        "reps": plan.batch_reps,
        "batch_chord": row(batch_ms, outcomes["batch"]),
        "single_sequential": row(sequential_ms, outcomes["seq"]),
        f"single_concurrent_{plan.single_concurrency}": row(concurrent_ms, outcomes["conc"]),
        "batch_errors": batch_errors,
    }


# -- c. onnxruntime ---------------------------------------------------------------------------


def run_onnxruntime(plan: Plan, samples: int, seed: int) -> dict[str, Any]:
    """Section c: Localizer batch 1 vs 16 per item, intra_op_num_threads 1 vs 2."""
    from heimdall.modelcard import MODEL_FILENAME, ModelIdentity
    from heimdall.registry import shipped_model_dir
    from heimdall.runtime import Localizer
    from heimdall.stations import load_network

    card = shipped_card()
    network = load_network()
    identity = ModelIdentity(name="heimdall-localizer", version="shipped", alias=None)
    reqs = [decoded_request(seed + i, samples) for i in range(16)]
    results: dict[str, Any] = {
        "measures": {
            "run_*": "Localizer.run (one onnxruntime session.run) only, features precomputed; "
            "ms per item",
            "predict_*": "Localizer.predict_results: features (STFT, mel) + run + result "
            "documents; ms per item",
            "features_per_item_ms": "Localizer.features for 16 requests / 16",
        },
        "model_onnx_sha256": card.onnx_sha256,
        "samples_per_station": samples,
        "reps": {"run": plan.onnx_run_reps, "predict": plan.onnx_predict_reps},
    }
    for threads in (1, 2):
        loc = Localizer(
            shipped_model_dir() / MODEL_FILENAME,
            card,
            network,
            identity,
            intra_op_threads=threads,
            inter_op_threads=1,
        )
        x, mask = loc.features(reqs)
        run1 = _timed(partial(loc.run, x[:1], mask[:1]), plan.onnx_run_reps)
        run16 = _timed(partial(loc.run, x, mask), plan.onnx_run_reps)
        feats = _timed(partial(loc.features, reqs), plan.onnx_predict_reps)
        pred1 = _timed(partial(loc.predict_results, reqs[:1]), plan.onnx_predict_reps)
        pred16 = _timed(partial(loc.predict_results, reqs), plan.onnx_predict_reps)
        results[f"intra_op_threads_{threads}"] = {
            "run_batch1_ms_per_item": median(run1),
            "run_batch16_ms_per_item": _per(median(run16), 16),
            "predict_batch1_ms_per_item": median(pred1),
            "predict_batch16_ms_per_item": _per(median(pred16), 16),
            "features_per_item_ms": _per(median(feats), 16),
        }
    return results


def _per(value: float | None, n: int) -> float | None:
    return round(value / n, 4) if value is not None else None


# -- report -------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """A human-readable summary of the report."""
    env = report["environment"]
    lines = [
        f"machine: {env['cores']} cores, load {env['load_average_before']} -> "
        f"{env['load_average_after']}, onnxruntime {env['packages'].get('onnxruntime')}, "
        f"celery {env['packages'].get('celery')}; quick={report['config']['quick']}",
    ]
    a = report.get("message_forms")
    if a:
        req = a["request"]
        lines.append(
            f"\na. message forms ({req['stations']} stations x {req['samples_per_station']} "
            f"samples = {req['floats']} floats; medians of {a['reps']}, ms)"
        )
        lines.append(
            f"  {'form':<12} {'msg bytes':>10} {'codec+redis':>12} {'celery no-op':>13} "
            f"{'heimdall.predict':>17}"
        )
        for form in ("pairs", "base64", "claim_check"):
            predict = a["heimdall_predict"].get(form, {}).get("median_round_trip_ms")
            lines.append(
                f"  {form:<12} {a['codec_redis'][form]['message_bytes']:>10} "
                f"{a['codec_redis'][form]['median_total_ms']:>12} "
                f"{a['celery_transport'][form]['median_round_trip_ms']:>13} "
                f"{predict if predict is not None else 'n/a':>17}"
            )
    b = report.get("batch_vs_single")
    if b:
        lines.append(f"\nb. {b['items']} items via HTTP (medians of {b['reps']})")
        for key, row in b.items():
            if isinstance(row, dict) and "median_wall_ms" in row:
                lines.append(
                    f"  {key:<22} wall {row['median_wall_ms']:>9} ms  "
                    f"{row['median_ms_per_item']:>7} ms/item  {row['items_per_s']:>7} items/s  "
                    f"{row['outcomes']}"
                )
    c = report.get("onnxruntime")
    if c:
        lines.append("\nc. onnxruntime, ms per item (medians)")
        lines.append(
            f"  {'threads':<8} {'run b1':>8} {'run b16':>8} {'pred b1':>8} {'pred b16':>9} "
            f"{'features':>9}"
        )
        for threads in (1, 2):
            r = c[f"intra_op_threads_{threads}"]
            lines.append(
                f"  {threads:<8} {r['run_batch1_ms_per_item']:>8} "
                f"{r['run_batch16_ms_per_item']:>8} {r['predict_batch1_ms_per_item']:>8} "
                f"{r['predict_batch16_ms_per_item']:>9} {r['features_per_item_ms']:>9}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Side-by-side measurements behind Heimdall's design choices.",
    )
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--samples", type=int, default=4096, help="IQ samples per station")
    parser.add_argument("--seed", type=int, default=7_000_000, help="first scene seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.compare``."""
    args = _parser().parse_args(argv)
    plan = Plan.quick() if args.quick else Plan.full()
    started = time.perf_counter()
    load_before = load_average()
    report: dict[str, Any] = {
        "benchmark": "compare",
        "config": {
            "quick": args.quick,
            "samples_per_station": args.samples,
            "seed": args.seed,
            "plan": dataclasses.asdict(plan),
        },
    }
    # onnxruntime first, before the stack's processes compete for the 2 cores.
    report["onnxruntime"] = run_onnxruntime(plan, args.samples, args.seed)
    # A long sync wait so a 64-item batch is answered in the request, not as a 202.
    with spawn_stack(extra_env={"HEIMDALL_PREDICT_TIMEOUT_S": "60"}) as stack:
        check_local_url(stack.base_url)
        report["stack"] = {
            "worker_concurrency": stack.worker_concurrency,
            "api_workers": stack.api_workers,
            "api_threads": stack.api_threads,
            "model_versions": stack.ready.get("model_versions"),
            "model": stack.model,
            "batch_chunk_size": Settings.model_fields["batch_chunk_size"].default,
            "predict_timeout_s": 60,
        }
        report["message_forms"] = run_message_forms(stack, plan, args.samples, args.seed + 100)
        report["batch_vs_single"] = run_batch_vs_single(
            stack.base_url, plan, args.samples, args.seed + 1000
        )
    report["environment"] = {
        **environment(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    report["runtime_s"] = round(time.perf_counter() - started, 1)
    print(format_report(report))
    print(f"total {report['runtime_s']} s")
    path = write_report(args.out, report)
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
