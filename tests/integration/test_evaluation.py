"""Evaluation smoke test: the shipped model on a small held-out set, through the CLI."""

import json

import pytest

from heimdall.cli import main


def test_evaluate_json_reports_every_family_with_model_baseline_and_coverage(capsys):
    assert main(["evaluate", "--json", "--scenes", "40", "--seed", "77"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_scenes_per_family"] == 40
    families = report["families"]
    assert set(families) == {"held-out", "second-law", "clean", "sparse", "outside", "fading"}
    for fam in families.values():
        for key in ("median_error_m", "mean_error_m", "p90_error_m"):
            assert fam["model"][key] > 0 and fam["baseline"][key] > 0
        assert 0.0 <= fam["model"]["coverage_68"] <= fam["model"]["coverage_95"] <= 1.0
        for kind in ("inside", "flagged"):
            c68, c95 = fam["model"][f"coverage_68_{kind}"], fam["model"][f"coverage_95_{kind}"]
            assert (c68 is None and c95 is None) or 0.0 <= c68 <= c95 <= 1.0
        ratio = fam["model"]["median_error_m"] / fam["baseline"]["median_error_m"]
        assert fam["model_to_baseline_median"] == pytest.approx(ratio, abs=2e-3)
    # A sanity bound, not a target: clean data localize far better than guessing the centre.
    assert families["clean"]["model"]["median_error_m"] < 60_000


def test_simulate_writes_a_valid_request(tmp_path):
    from heimdall.iq import decode_request
    from heimdall.stations import load_network

    out = tmp_path / "req.json"
    assert main(["simulate", "--out", str(out), "--seed", "3", "--samples", "1024"]) == 0
    body = json.loads(out.read_text())
    net = load_network()
    req = decode_request(body, stations=net.ids, band_mhz=(144.0, 146.0), min_stations=3)
    assert len(req.stations) >= 3
    assert {"latitude", "longitude"} <= set(body["truth"])
