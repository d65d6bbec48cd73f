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


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
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
        timeout=RUN_TIMEOUT_S,
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
