"""What every benchmark report carries: the machine, the versions, summary statistics."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = (
    "heimdall-inference",
    "celery",
    "kombu",
    "redis",
    "flask",
    "gunicorn",
    "onnxruntime",
    "numpy",
    "requests",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _redis_server_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # "Redis server v=7.0.15 sha=... malloc=jemalloc-5.3.0 bits=64 build=..."
    for token in out.split():
        if token.startswith("v="):
            return token[2:]
    return out.strip() or None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (how busy the shared machine was)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _command() -> str:
    """How this process was started, as the user typed it (``python -m benchmarks.x ...``)."""
    script = Path(sys.argv[0])
    if script.parent.name == "benchmarks" and script.suffix == ".py":
        return " ".join(["python", "-m", f"benchmarks.{script.stem}", *sys.argv[1:]])
    return " ".join([Path(sys.executable).name, *sys.argv])


def environment() -> dict[str, Any]:
    """The machine and software a measurement ran on."""
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "redis_server": _redis_server_version(),
        "command": _command(),
    }


def summarize_ms(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """Count, min, p50, p90, p99, max and mean of durations in milliseconds."""
    if not values_ms:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None,
                "mean": None}  # fmt: skip
    arr = np.asarray(values_ms, dtype=float)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "n": int(arr.size),
        "min": round(float(arr.min()), 3),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(arr.max()), 3),
        "mean": round(float(arr.mean()), 3),
    }


def median(values: Sequence[float]) -> float | None:
    """Median rounded to 3 decimals; None for no values."""
    return round(float(np.median(values)), 3) if len(values) else None


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as indented JSON at ``path`` (folders created); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path
