"""Per-item cost of the worker's compute steps, one request at a time and in a batch of 40.

    PYTHONPATH=$PWD python -m benchmarks.compute_steps

Steps: features (IQ -> station features), ONNX run, posterior refinement
(``Localizer.estimate`` minus its ONNX run), localize, result documents. Single
requests report the mean over 40 requests (the posterior's cost depends on how
many stations did not detect the signal, so a median hides the expensive
ones); each figure is the median of ``--passes`` passes, in ms per item.
It runs unchanged on older code, to compare before and after.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.serving import RequestScorer
from benchmarks.workload import decoded_request
from heimdall.iq import DecodedRequest
from heimdall.runtime import Localizer, localization_result

STEPS = ("features", "onnx", "posterior", "localize", "documents", "total")


def _steps(localizer: Localizer, requests: Sequence[DecodedRequest]) -> dict[str, float]:
    """Seconds spent in each step for one call on ``requests``."""
    t0 = time.perf_counter()
    x, mask = localizer.features(requests)
    t1 = time.perf_counter()
    localizer.run(x, mask)
    t2 = time.perf_counter()
    position, covariance, posts = localizer.estimate(x, mask)
    t3 = time.perf_counter()
    locs = localizer.localize(position, covariance, posts, mask, x)
    t4 = time.perf_counter()
    for loc in locs:
        localization_result(loc, localizer.card, localizer.identity, inference_time_ms=0.0)
    t5 = time.perf_counter()
    onnx = t2 - t1
    times = (t1 - t0, onnx, t3 - t2 - onnx, t4 - t3, t5 - t4, t5 - t0 - onnx)
    return dict(zip(STEPS, times, strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    """Print the per-item ms of each step, single and batched."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args(argv)
    localizer = RequestScorer().localizer
    requests = [decoded_request(seed) for seed in range(40)]
    localizer.predict_results(requests[:4])
    for label, batches in (("single", [[r] for r in requests]), ("batch of 40", [requests])):
        passes = []
        for _ in range(args.passes):
            total = dict.fromkeys(STEPS, 0.0)
            for batch in batches:
                for step, seconds in _steps(localizer, batch).items():
                    total[step] += seconds
            passes.append(total)
        per_item = {
            step: round(float(np.median([p[step] for p in passes])) * 1e3 / len(requests), 3)
            for step in STEPS
        }
        print(f"{label:>12}: " + "  ".join(f"{k} {v}" for k, v in per_item.items()))


if __name__ == "__main__":
    main()
