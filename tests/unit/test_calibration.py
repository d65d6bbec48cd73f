"""The heteroscedastic covariance model of served estimates and its calibration."""

import json
import shutil

import numpy as np
import pytest

from heimdall.cli import main
from heimdall.geo import CHI2_SCALE
from heimdall.modelcard import ModelCard, ModelIdentity, sha256_file
from heimdall.registry import shipped_model_dir
from heimdall.runtime import CovarianceModel, Localization, Localizer, localization_result
from heimdall.simulate.dataset import build_dataset
from heimdall.simulate.families import EVALUATION
from heimdall.stations import load_network
from heimdall.training.calibration import FamilyResiduals, fit_covariance_model

FITTED = CovarianceModel(scale=2.0, misfit_power=1.5, misfit_knee_db=5.0, outside_growth=0.8)


def test_a_card_without_a_covariance_model_serves_the_posterior_unscaled():
    neutral = CovarianceModel.from_fusion({})
    factor = neutral.factor(np.array([-5_000.0, 0.0, 80_000.0]), np.array([1.5, 6.0, 10.0]))
    np.testing.assert_allclose(factor, 1.0)


def test_the_fusion_block_round_trips():
    assert CovarianceModel.from_fusion(FITTED.to_fusion()) == FITTED
    with_k = CovarianceModel(2.0, 1.5, 5.0, 0.8, ((0.68, 1.42), (0.95, 3.2)))
    assert with_k.to_fusion()["ellipse_k"] == {"0.68": 1.42, "0.95": 3.2}
    assert CovarianceModel.from_fusion(with_k.to_fusion()) == with_k


def test_a_card_without_ellipse_k_draws_chi_square_ellipses_and_one_with_them_its_own():
    doc = json.loads((shipped_model_dir() / "model_card.json").read_text())
    loc = Localization(1_000.0, -2_000.0, 30_000.0, 20_000.0, 0.3, 45.0, 8.0)
    major_sd = np.sqrt(np.linalg.eigvalsh(loc.covariance)[1])
    served_k = {}
    for ellipse_k in (None, {"0.68": 1.42, "0.95": 3.2}):
        doc["fusion"].pop("ellipse_k", None)
        if ellipse_k is not None:
            doc["fusion"]["ellipse_k"] = ellipse_k
        card = ModelCard.from_dict(doc)
        result = localization_result(
            loc, card, ModelIdentity("local", "file", None), inference_time_ms=1.0
        )
        ellipses = result["uncertainty"]["ellipses"]
        for e in ellipses:
            assert e["semi_major_m"] == pytest.approx(e["scale_k"] * major_sd, rel=1e-4)
        polygons = [f["properties"] for f in result["geojson"]["features"][1:]]
        assert [p["scale_k"] for p in polygons] == [e["scale_k"] for e in ellipses]
        served_k[ellipse_k is None] = [e["scale_k"] for e in ellipses]
    assert served_k[True] == [round(CHI2_SCALE[0.68], 4), round(CHI2_SCALE[0.95], 4)]
    assert served_k[False] == [1.42, 3.2]
    assert CovarianceModel.from_fusion({}).ellipse_scale(0.95) == CHI2_SCALE[0.95]


def test_ellipses_grow_outside_the_network_and_not_inside_it():
    hull = np.array([-30_000.0, 0.0, 25_000.0, 50_000.0, 100_000.0])
    factor = FITTED.factor(hull, np.full(hull.shape, 6.0))
    assert factor[0] == factor[1] == pytest.approx(2.0)
    assert np.all(np.diff(factor[1:]) > 0)
    assert factor[3] == pytest.approx(2.0 * 1.8**2)


def test_ellipses_grow_with_the_misfit_up_to_the_knee_and_shrink_on_clean_powers():
    misfit = np.array([0.5, 1.5, 3.0, 5.0, 8.0, 12.0])
    factor = FITTED.factor(np.zeros(misfit.shape), misfit)
    assert factor[0] == factor[1] == pytest.approx(2.0 * (1.5 / 5.0) ** 1.5)
    assert factor[1] < factor[2] < factor[3]
    np.testing.assert_allclose(factor[3:], 2.0)


def _gaussian_family(rng, n, model):
    """Residuals that are exactly Gaussian under ``model``'s covariance."""
    hull = rng.uniform(-40_000.0, 90_000.0, n)
    misfit = rng.uniform(1.0, 10.0, n)
    d2 = rng.chisquare(2, n) * model.factor(hull, misfit)
    return FamilyResiduals(d2=d2, hull_distance_m=hull, misfit_db=misfit)


def test_the_fit_finds_a_covariance_model_that_covers_every_family():
    rng = np.random.default_rng(0)
    families = {name: _gaussian_family(rng, 4_000, FITTED) for name in ("a", "b", "c")}
    model = fit_covariance_model(families)
    for fam in families.values():
        c68, c95 = fam.coverage(model)
        assert c68 == pytest.approx(0.68, abs=0.02) and c95 == pytest.approx(0.95, abs=0.015)
    hull, misfit = np.array([0.0, 60_000.0, 0.0]), np.array([6.0, 6.0, 2.0])
    np.testing.assert_allclose(model.factor(hull, misfit), FITTED.factor(hull, misfit), rtol=0.2)


def _heavy_tailed_family(rng, n, model, dof):
    """Residuals of a bivariate Student-t with ``dof`` degrees of freedom under ``model``."""
    hull = rng.uniform(-40_000.0, 90_000.0, n)
    misfit = rng.uniform(1.0, 10.0, n)
    d2 = rng.chisquare(2, n) * dof / rng.chisquare(dof, n) * model.factor(hull, misfit)
    return FamilyResiduals(d2=d2, hull_distance_m=hull, misfit_db=misfit)


def test_the_fitted_ellipse_k_give_the_target_coverage_on_the_data_they_were_fitted_on():
    rng = np.random.default_rng(1)
    families = {name: _heavy_tailed_family(rng, 4_000, FITTED, 5) for name in ("a", "b", "c")}
    model = fit_covariance_model(families)
    for fam in families.values():
        c68, c95 = fam.coverage(model)
        assert c68 == pytest.approx(0.68, abs=0.015) and c95 == pytest.approx(0.95, abs=0.01)
    # One chi-square k pair cannot: the tail puts the 95 % ellipse far out of reach.
    k68, k95 = (k for _, k in model.ellipse_k)
    assert k95 / k68 > 1.15 * CHI2_SCALE[0.95] / CHI2_SCALE[0.68]
    gaussian = CovarianceModel(model.scale, model.misfit_power, model.misfit_knee_db)
    assert min(fam.coverage(gaussian)[1] for fam in families.values()) < 0.92


def test_calibrate_rewrites_the_fusion_block_and_leaves_the_network_alone(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(shipped_model_dir(), model_dir)
    before = json.loads((model_dir / "model_card.json").read_text())
    digest = sha256_file(model_dir / "model.onnx")
    args = ["calibrate", "--model-dir", str(model_dir), "--scenes", "30", "--seed", "11"]
    assert main([*args, "--eval-scenes", "0"]) == 0
    card = ModelCard.load(model_dir / "model_card.json")
    card.check_model(model_dir / "model.onnx")
    assert sha256_file(model_dir / "model.onnx") == digest
    assert card.fusion["likelihood"] == before["fusion"]["likelihood"]
    fitted = CovarianceModel.from_fusion(card.fusion)
    assert fitted.scale > 0
    assert [c for c, _ in fitted.ellipse_k] == [0.68, 0.95]
    assert card.training["calibration_seed"] == 11 and card.training["calibration_scenes"] == 30
    assert set(card.training["calibration_coverage"]) >= {"calibration", "outside"}
    assert card.accuracy == before["accuracy"]
    summary = json.loads((model_dir / "training.json").read_text())
    assert summary["calibration_seed"] == 11 and summary["scenes"] == before["training"]["scenes"]


def test_a_smaller_prior_scale_keeps_the_estimate_nearer_the_network(tmp_path):
    network = load_network()
    card = ModelCard.load(shipped_model_dir() / "model_card.json")
    data = build_dataset(40, 5, network, EVALUATION["second-law"], card.features)
    shifts = []
    for prior_scale in (1.0, 0.5):
        model_dir = tmp_path / str(prior_scale)
        shutil.copytree(shipped_model_dir(), model_dir)
        doc = json.loads((model_dir / "model_card.json").read_text())
        doc["fusion"]["prior_scale"] = prior_scale
        (model_dir / "model_card.json").write_text(json.dumps(doc))
        served = Localizer(
            model_dir / "model.onnx",
            ModelCard.load(model_dir / "model_card.json"),
            network,
            ModelIdentity("local", "file", None),
        )
        net_position, _ = served.run(data.x, data.mask)
        mean, _, _ = served.estimate(data.x, data.mask)
        shifts.append(np.median(np.linalg.norm(mean - net_position, axis=1)))
    assert shifts[1] < shifts[0]
