"""`heimdall train` end to end on a tiny set (needs the train extra; CI installs it)."""

import json

import pytest

pytest.importorskip("torch", reason="torch is in the optional 'train' extra; not installed")

from heimdall.cli import main
from heimdall.modelcard import ModelCard

pytestmark = pytest.mark.train


def test_train_exports_a_servable_model_with_its_card(tmp_path, capsys):
    out = tmp_path / "model"
    args = ["train", "--out", str(out), "--scenes", "400", "--val-scenes", "100"]
    assert main([*args, "--epochs", "2", "--eval-scenes", "30", "--calibration-scenes", "40"]) == 0
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "training took" in printed
    card = ModelCard.load(out / "model_card.json")
    card.check_model(out / "model.onnx")
    assert card.training["onnx_max_abs_diff"] < 1e-4
    assert card.accuracy["evaluation_scenes"] == 30
    assert card.fusion["covariance_scale"] > 0 and "misfit_power" in card.fusion
    assert card.training["calibration_scenes"] == 40
    assert set(card.training["calibration_coverage"]) == set(card.training["calibration_families"])
    summary = json.loads((out / "training.json").read_text())
    assert summary["scenes"] == 400 and summary["training_s"] > 0


def test_training_is_seeded(tmp_path):
    """The same seed gives the same exported network, byte for byte."""
    for name in ("a", "b"):
        main(
            [
                "train",
                "--out",
                str(tmp_path / name),
                "--scenes",
                "300",
                "--val-scenes",
                "60",
                "--epochs",
                "1",
                "--eval-scenes",
                "10",
                "--calibration-scenes",
                "20",
            ]
        )
    a = (tmp_path / "a" / "model.onnx").read_bytes()
    b = (tmp_path / "b" / "model.onnx").read_bytes()
    assert a == b
