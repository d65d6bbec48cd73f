"""Registry round trip against a real sqlite MLflow store."""

import json
import shutil

import pytest

from heimdall.config import Settings
from heimdall.errors import ModelCardInvalid, ModelUnavailable
from heimdall.modelcard import sha256_file
from heimdall.registry import register_model, resolve, resolve_version, shipped_model_dir


def variant_model(folder, note):
    """A copy of the shipped model whose ONNX bytes (metadata only) and card differ."""
    import onnx

    shutil.copytree(shipped_model_dir(), folder)
    model = onnx.load(str(folder / "model.onnx"))
    model.doc_string = note
    onnx.save(model, str(folder / "model.onnx"))
    card = json.loads((folder / "model_card.json").read_text())
    card["onnx_sha256"] = sha256_file(folder / "model.onnx")
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Settings(var_dir=tmp_path / "var", mlflow_tracking_uri=None)


def test_register_then_resolve_yields_the_shipped_model(settings):
    identity, created = register_model(settings)
    assert created and identity.alias == "champion"
    resolved = resolve(settings)
    assert resolved.identity.version == identity.version
    assert sha256_file(resolved.onnx_path) == sha256_file(shipped_model_dir() / "model.onnx")
    assert resolved.card.slots == resolve(settings).card.slots
    assert str(settings.var_dir.resolve()) in str(resolved.onnx_path)


def test_registering_twice_is_harmless(settings):
    first, _ = register_model(settings)
    again, created = register_model(settings)
    assert not created and again.version == first.version


def test_a_recalibrated_card_is_a_new_version(settings, tmp_path):
    first, _ = register_model(settings)
    folder = tmp_path / "recalibrated"
    shutil.copytree(shipped_model_dir(), folder)
    card = json.loads((folder / "model_card.json").read_text())
    card["fusion"]["covariance_scale"] = 2 * float(card["fusion"]["covariance_scale"])
    (folder / "model_card.json").write_text(json.dumps(card))

    second, created = register_model(settings, folder, alias="challenger")

    assert created and second.version != first.version  # same ONNX, other answers
    served = resolve(settings, "challenger").card.fusion["covariance_scale"]
    assert served == card["fusion"]["covariance_scale"]


def test_aliases_choose_the_version(settings, tmp_path):
    register_model(settings)
    other = variant_model(tmp_path / "other", "challenger")
    card = json.loads((other / "model_card.json").read_text())
    challenger, created = register_model(settings, other, alias="challenger")
    assert created
    assert resolve_version(settings, "challenger").version == challenger.version
    assert resolve_version(settings, "champion").version != challenger.version
    assert resolve(settings, "challenger").card.onnx_sha256 == card["onnx_sha256"]


def test_unknown_alias_is_model_unavailable(settings):
    register_model(settings)
    with pytest.raises(ModelUnavailable, match="no-such-alias"):
        resolve(settings, "no-such-alias")


def test_a_model_without_a_card_is_refused(settings, tmp_path):
    """A version logged by hand (no model card) must never be served."""
    import mlflow
    import mlflow.onnx
    import onnx

    from heimdall.registry import _registry

    register_model(settings)
    with _registry(settings) as client:
        experiment = client.create_experiment(
            "manual", artifact_location=(tmp_path / "manual").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.onnx.log_model(
                onnx.load(str(shipped_model_dir() / "model.onnx")),
                name="model",
                registered_model_name=settings.model_name,
                onnx_execution_providers=["CPUExecutionProvider"],
                save_as_external_data=False,
            )
        client.set_registered_model_alias(
            settings.model_name, "cardless", info.registered_model_version
        )
    with pytest.raises(ModelCardInvalid, match=r"model_card\.json"):
        resolve(settings, "cardless")


def test_register_if_missing_never_moves_an_existing_alias(settings, tmp_path, monkeypatch, capsys):
    """Start-up registration must not undo an operator's promotion."""
    from heimdall import config
    from heimdall.cli import main

    monkeypatch.setenv("HEIMDALL_VAR_DIR", str(settings.var_dir))
    config.get_settings.cache_clear()
    try:
        assert main(["model", "register", "--if-missing"]) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["created"] is True
        # An operator points champion at another version.
        other = variant_model(tmp_path / "other", "promoted")
        promoted, _ = register_model(settings, other, alias="champion")
        assert main(["model", "register", "--if-missing"]) == 0
        capsys.readouterr()
        assert resolve_version(settings, "champion").version == promoted.version
    finally:
        # Restore the environment before dropping the cached settings, so the next
        # get_settings() reads the session's environment, not this test's.
        monkeypatch.undo()
        config.get_settings.cache_clear()


def test_registry_calls_leave_the_process_configuration_alone(settings, monkeypatch):
    """mlflow.set_tracking_uri writes os.environ; the registry must undo that."""
    import os

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/elsewhere.db")
    register_model(settings)
    resolve(settings)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////nonexistent/elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    resolve_version(settings)
    assert "MLFLOW_TRACKING_URI" not in os.environ
