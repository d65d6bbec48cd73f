"""The benchmarks run end to end and write their reports (no timing is asserted).

Each benchmark is run as its user runs it, ``python -m benchmarks.<name>``, in
a subprocess that spawns its own isolated stack (private redis-server, temporary
sqlite registry, real prefork worker, gunicorn); the test checks the exit code
and the shape of the JSON report. Numbers on a shared 2-core machine are noise,
so none is compared with anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 180.0
PERCENTILES = {"n", "min", "p50", "p90", "p99", "max", "mean"}

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` from the repository root, without the session's service variables."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found; install it: sudo apt-get install -y redis-server")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HEIMDALL_", "CELERY_", "MLFLOW_", "PROMETHEUS_"))
    }
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def _read(path: Path) -> dict[str, Any]:
    assert path.is_file(), f"no report at {path}"
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def test_load_spawns_a_stack_and_reports_both_passes(tmp_path: Path) -> None:
    out = tmp_path / "load.json"

    proc = _run(
        ["benchmarks.load", "--spawn", "--requests", "20", "--concurrency", "2", "--out", str(out)]
    )

    report = _read(out)
    assert report["benchmark"] == "load"
    assert report["config"]["requests"] == 20 and report["config"]["concurrency"] == 2
    assert report["environment"]["cores"] >= 1
    assert report["environment"]["packages"]["onnxruntime"]
    assert report["spawned_stack"]["model_versions"]
    assert len(report["spawned_stack"]["model"]["onnx_sha256"]) == 64
    for name in ("distinct", "repeated"):
        p = report["passes"][name]
        assert p["requests"] == 20
        assert sum(p["status_counts"].values()) == 20
        assert set(p["latency_ms"]) == PERCENTILES
        assert {"throughput_rps", "wall_s", "cache_hits", "mean_inference_time_ms"} <= set(p)
    assert "distinct" in proc.stdout and "repeated" in proc.stdout


def test_compare_quick_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"

    _run(["benchmarks.compare", "--quick", "--out", str(out)])

    report = _read(out)
    assert report["benchmark"] == "compare" and report["config"]["quick"] is True
    forms = report["message_forms"]
    assert set(forms["codec_redis"]) == {"pairs", "base64", "claim_check"}
    assert set(forms["celery_transport"]) == {"pairs", "base64", "claim_check"}
    assert set(forms["heimdall_predict"]) == {"base64", "claim_check"}
    assert all(v["item_statuses"] for v in forms["heimdall_predict"].values())
    assert forms["codec_redis"]["claim_check"]["message_bytes"] < 1024  # only the key travels
    batch = report["batch_vs_single"]
    for key in ("batch_chord", "single_sequential", "single_concurrent_4"):
        assert {"median_wall_ms", "median_ms_per_item", "items_per_s", "outcomes"} <= set(
            batch[key]
        )
    assert batch["batch_chord"]["outcomes"]["succeeded"] == batch["items"]
    for threads in (1, 2):
        row = report["onnxruntime"][f"intra_op_threads_{threads}"]
        assert set(row) == {
            "run_batch1_ms_per_item",
            "run_batch16_ms_per_item",
            "predict_batch1_ms_per_item",
            "predict_batch16_ms_per_item",
            "features_per_item_ms",
        }
    assert len(report["stack"]["model"]["onnx_sha256"]) == 64
    assert len(report["onnxruntime"]["model_onnx_sha256"]) == 64
    assert report["environment"]["cores"] >= 1


BENCH_TIMEOUT_S = 900.0
"""Four systems started one after the other, 9 passes of 3 + 1 s: minutes on a busy machine."""
PASS_KEYS = {"throughput_rps", "items_per_s", "latency_ms", "success_rate", "cache_hit_rate",
             "cpu_s", "cpu_cores_used", "service_cpu_ms_per_item", "statuses"}  # fmt: skip


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_bench_tiny_run_reports_every_scenario_and_system(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail(
            "wrk not found; install it: bash benchmarks/ensure-wrk.sh (apt-get install wrk)"
        )
    out = tmp_path / "bench.json"

    proc = _run(
        ["benchmarks.bench", "--quick", "--duration", "3", "--warmup", "1", "--connections", "4",
         "--batch-items", "4", "--out", str(out)],
        timeout_s=BENCH_TIMEOUT_S,
    )  # fmt: skip

    report = _read(out)
    assert report["benchmark"] == "bench" and report["config"]["connections"] == 4
    service = report["systems"]["service"]["scenarios"]
    assert set(service) == {"miss", "hit", "mixed", "batch", "async", "pairs", "slow"}
    for name, result in service.items():
        assert set(result) >= PASS_KEYS, name
        assert {"api", "worker", "redis", "wrk"} <= set(result["cpu_s"]), name
    assert sum(result["answered_ok"] for result in service.values()) > 0
    # The wrk script makes every "distinct" body decode to new samples: none is a hit.
    for name in ("miss", "batch", "pairs"):
        assert service[name]["cache_hits"] == 0, name
    assert service["hit"]["cache_hits"] > 0
    assert service["async"]["submitted"] > 0
    probes = service["slow"]["probes"]
    assert probes["/health"]["probes"] > 0 and probes["/ready"]["probes"] > 0
    assert service["slow"]["slow_clients"]["count"] == 20
    for system in ("noqueue", "mlflow_pyfunc", "mlflow_onnx"):
        result = report["systems"][system]["scenarios"]["miss"]
        assert result["answered_ok"] > 0 and "server" in result["cpu_s"], system
    floor = report["compute_floor"]
    assert floor["single_ms"] > 0 and floor["batched_ms_per_item"] > 0
    assert floor["pairs"]["parse_ms_per_mb"] > 0
    ratios = {"miss_rps_over_mlflow_pyfunc", "miss_rps_over_noqueue", "hit_rps_over_miss",
              "batch_cpu_per_item_over_miss", "original_requirement"}  # fmt: skip
    assert set(report["ratios"]) >= ratios
    assert report["environment"]["wrk"] and report["environment"]["load_average_before"]
    chart = Path(report["chart"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Ratios (target):" in proc.stdout and "service miss" in proc.stdout
