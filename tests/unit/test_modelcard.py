"""The shipped model card and the refusals of inconsistent cards."""

import json
import shutil

import pytest

from heimdall.errors import ModelCardInvalid
from heimdall.modelcard import ModelCard
from heimdall.registry import shipped_model_dir
from heimdall.stations import load_network


def shipped():
    return json.loads((shipped_model_dir() / "model_card.json").read_text())


def test_shipped_card_describes_the_shipped_model():
    card = ModelCard.load(shipped_model_dir() / "model_card.json")
    card.check_model(shipped_model_dir() / "model.onnx")
    assert set(card.slots) == set(load_network().ids)
    assert card.features.sample_rate_hz == 16_000
    assert card.inputs[0].shape == (None, len(card.slots), card.features.n_features)
    assert card.accuracy["median_error_m"] > 0
    assert set(card.accuracy["families"]) >= {"held-out", "second-law", "clean", "sparse"}
    assert card.fusion["covariance_scale"] > 0 and card.fusion["likelihood"]["exponents"]
    assert card.training["training_s"] > 0


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda c: c.pop("normalization"),
        lambda c: c.update(format=99),
        lambda c: c["inputs"][0].update(shape=[None, 3, 3]),
        lambda c: c["stations"].append(dict(c["stations"][0])),
        lambda c: c["normalization"].update(std_db=0),
        lambda c: c["outputs"].reverse(),
    ],
)
def test_inconsistent_cards_are_refused(corrupt):
    data = shipped()
    corrupt(data)
    with pytest.raises(ModelCardInvalid):
        ModelCard.from_dict(data)


def test_a_card_for_another_onnx_file_is_refused(tmp_path):
    shutil.copy(shipped_model_dir() / "model_card.json", tmp_path / "model_card.json")
    (tmp_path / "model.onnx").write_bytes(b"not the model")
    card = ModelCard.load(tmp_path / "model_card.json")
    with pytest.raises(ModelCardInvalid, match="sha256"):
        card.check_model(tmp_path / "model.onnx")


def test_missing_card_is_refused(tmp_path):
    with pytest.raises(ModelCardInvalid, match="missing"):
        ModelCard.load(tmp_path / "model_card.json")
