"""Scoring against ground truth and the live figures of a version (pure functions)."""

from __future__ import annotations

import json

import pytest

from heimdall.lifecycle import (
    CHI2_2DOF_68,
    CHI2_2DOF_95,
    PerfEvent,
    accuracy,
    latency_field,
    score,
    summarize,
)

METERS_PER_DEG_LAT = 111_132.0  # near 45 degrees north


def test_chi_square_radii_are_the_2_dof_quantiles() -> None:
    from scipy.stats import chi2

    assert chi2.ppf(0.68, 2) == pytest.approx(CHI2_2DOF_68, abs=1e-4)
    assert chi2.ppf(0.95, 2) == pytest.approx(CHI2_2DOF_95, abs=1e-4)


@pytest.mark.parametrize(
    ("north_m", "inside_68", "inside_95"),
    [(0.0, True, True), (1_000.0, True, True), (2_000.0, False, True), (3_000.0, False, False)],
)
def test_score_uses_the_mahalanobis_distance(
    north_m: float, inside_68: bool, inside_95: bool
) -> None:
    # sigma 1 km each way: d^2 = (north / 1 km)^2 -> 0, 1, 4, 9.
    truth = (45.0 + north_m / METERS_PER_DEG_LAT, 8.0)
    scored = score(45.0, 8.0, [[1.0e6, 0.0], [0.0, 1.0e6]], truth)
    assert scored["error_km"] == pytest.approx(north_m / 1000.0, abs=0.01)
    assert scored["inside_68"] is inside_68
    assert scored["inside_95"] is inside_95


def test_score_counts_with_the_k_the_answer_drew_its_ellipses_with() -> None:
    # sigma 1 km each way, truth 2 km north (d^2 = 4): outside a k = 1.4 ellipse and
    # inside a k = 3.2 one; 3 km north (d^2 = 9) is outside the chi-square 95 % ellipse.
    cov = [[1.0e6, 0.0], [0.0, 1.0e6]]
    k = {"0.68": 1.4, "0.95": 3.2}
    two, three = ((45.0 + m / METERS_PER_DEG_LAT, 8.0) for m in (2_000.0, 3_000.0))
    assert score(45.0, 8.0, cov, two, k)["inside_68"] is False
    assert score(45.0, 8.0, cov, three, k)["inside_95"] is True
    assert score(45.0, 8.0, cov, three, {})["inside_95"] is False


def test_an_elongated_ellipse_holds_the_truth_along_its_long_axis_only() -> None:
    # sigma 5 km east, 500 m north: 3 km east is inside, 3 km north is not.
    cov = [[25.0e6, 0.0], [0.0, 0.25e6]]
    east = score(45.0, 8.0, cov, (45.0, 8.0 + 3_000.0 / 78_850.0))
    north = score(45.0, 8.0, cov, (45.0 + 3_000.0 / METERS_PER_DEG_LAT, 8.0))
    assert east["inside_68"] and not north["inside_95"]


def test_a_degenerate_covariance_holds_nothing() -> None:
    scored = score(45.0, 8.0, [[0.0, 0.0], [0.0, 0.0]], (45.01, 8.0))
    assert scored["inside_95"] is False and scored["mahalanobis2"] is None


def test_accuracy_summarizes_a_truth_list() -> None:
    entries = [
        json.dumps({"error_km": e, "inside_68": i68, "inside_95": i95})
        for e, i68, i95 in [(1.0, True, True), (3.0, False, True), (2.0, True, True), (9.0, 0, 0)]
    ] + ["not json"]
    assert accuracy(entries) == {
        "n": 4,
        "median_error_km": 2.5,
        "coverage_68": 0.5,
        "coverage_95": 0.75,
    }
    assert accuracy([])["median_error_km"] is None


def test_summarize_counts_and_the_p95_bucket() -> None:
    counters: dict[str, float] = {}
    events = [PerfEvent("3", latency_ms=8.0) for _ in range(19)]
    events += [PerfEvent("3", latency_ms=400.0), PerfEvent("3", cached=True)]
    events += [PerfEvent("3", error=True), PerfEvent("3", fallback=True)]
    for event in events:
        for field, amount in event.increments().items():
            counters[field] = counters.get(field, 0) + amount
    figures = summarize({k.encode(): str(v).encode() for k, v in counters.items()})
    assert figures["requests"] == 23
    assert figures["cached"] == 1 and figures["errors"] == 1 and figures["fallbacks"] == 1
    assert figures["cache_hit_rate"] == pytest.approx(1 / 23, abs=1e-4)
    assert figures["latency_ms"]["timed"] == 20
    assert figures["latency_ms"]["mean"] == pytest.approx((19 * 8 + 400) / 20)
    assert figures["latency_ms"]["p95"] == 10.0  # 19 of 20 are <= 10 ms
    assert latency_field(50_000) == "le_inf"
    assert summarize({})["latency_ms"]["mean"] is None
