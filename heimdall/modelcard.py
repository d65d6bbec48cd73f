"""The model card: everything a served model expects and emits.

Stored with every registered model (``model_card.json`` beside the ONNX file).
Serving reads preprocessing parameters from the card, never from code
constants, and refuses a model whose card is missing or contradicts the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heimdall.errors import ModelCardInvalid
from heimdall.features import FeatureParams

CARD_FILENAME = "model_card.json"
MODEL_FILENAME = "model.onnx"
CARD_FORMAT = 1


@dataclass(frozen=True)
class ModelIdentity:
    """Which registered model answered."""

    name: str
    version: str
    alias: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"name": self.name, "version": self.version, "alias": self.alias}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None for the dynamic batch axis) and dtype of one ONNX tensor."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelCard:
    """What a localization model expects and emits."""

    stations: tuple[dict[str, Any], ...]
    """Stations in slot order (id, name, latitude, longitude, altitude_m, calibration_db)."""
    features: FeatureParams
    normalization_mean_db: float
    normalization_std_db: float
    origin_latitude: float
    """Origin of the local plane of the outputs (network centroid), degrees."""
    origin_longitude: float
    band_mhz: tuple[float, float]
    """Carrier range the model was trained for, MHz."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_units: dict[str, str]
    onnx_sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    """How serving combines the network with the physical likelihood: ``likelihood``
    (heimdall.baseline.LikelihoodParams fields), ``prior_scale`` (the network's
    covariance as the posterior's prior is multiplied by it), and the covariance
    model of the answer: ``covariance_scale``, ``misfit_power``, ``misfit_knee_db``,
    ``outside_growth`` (see heimdall.runtime.CovarianceModel), and ``ellipse_k``: the
    scale of each confidence's ellipse, fitted on the calibration families (absent:
    the chi-square values)."""
    reference: dict[str, Any] = field(default_factory=dict)
    """The answer to a known input, recorded when the version was registered
    (:func:`heimdall.smoke.reference_answer`): ``seed`` and ``n_samples`` of the
    simulated request, ``latitude``/``longitude`` answered (degrees) and
    ``tolerance_m``. A reload refuses a version that no longer gives this answer.
    Empty for a card written before registration (training output)."""

    @property
    def slots(self) -> tuple[str, ...]:
        """Station ids in slot order."""
        return tuple(str(s["id"]) for s in self.stations)

    @property
    def calibration_db(self) -> dict[str, float]:
        """Station id -> calibration offset (dBFS -> dBm) the model was trained with."""
        return {str(s["id"]): float(s["calibration_db"]) for s in self.stations}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the file format); ``reference`` only once recorded."""
        document: dict[str, Any] = {
            "format": CARD_FORMAT,
            "stations": list(self.stations),
            "features": self.features.to_dict(),
            "normalization": {
                "mean_db": self.normalization_mean_db,
                "std_db": self.normalization_std_db,
            },
            "origin": {"latitude": self.origin_latitude, "longitude": self.origin_longitude},
            "band_mhz": list(self.band_mhz),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "output_units": self.output_units,
            "onnx_sha256": self.onnx_sha256,
            "training": self.training,
            "accuracy": self.accuracy,
            "fusion": self.fusion,
        }
        if self.reference:
            document["reference"] = self.reference
        return document

    def dumps(self) -> str:
        """Canonical JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Parse and check a card; :class:`ModelCardInvalid` says what is wrong."""
        try:
            if data.get("format") != CARD_FORMAT:
                raise ValueError(f"unsupported card format {data.get('format')!r}")
            stations = tuple(dict(s) for s in data["stations"])
            for s in stations:
                for key in ("id", "latitude", "longitude", "calibration_db"):
                    if key not in s:
                        raise ValueError(f"station entry without {key!r}: {s}")
            card = cls(
                stations=stations,
                features=FeatureParams.from_dict(data["features"]),
                normalization_mean_db=float(data["normalization"]["mean_db"]),
                normalization_std_db=float(data["normalization"]["std_db"]),
                origin_latitude=float(data["origin"]["latitude"]),
                origin_longitude=float(data["origin"]["longitude"]),
                band_mhz=(float(data["band_mhz"][0]), float(data["band_mhz"][1])),
                inputs=tuple(_tensor(t) for t in data["inputs"]),
                outputs=tuple(_tensor(t) for t in data["outputs"]),
                output_units=dict(data["output_units"]),
                onnx_sha256=str(data["onnx_sha256"]),
                training=dict(data.get("training", {})),
                accuracy=dict(data.get("accuracy", {})),
                fusion=dict(data.get("fusion", {})),
                reference=dict(data.get("reference", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelCardInvalid(f"model card is malformed: {exc}") from exc
        card._check_self()
        return card

    def _check_self(self) -> None:
        if len(set(self.slots)) != len(self.slots) or not self.slots:
            raise ModelCardInvalid("model card lists no stations or a station twice")
        if self.normalization_std_db <= 0:
            raise ModelCardInvalid("model card normalization std must be positive")
        names = [t.name for t in self.inputs]
        if names != ["features", "mask"]:
            raise ModelCardInvalid(f"model card inputs must be features, mask; got {names}")
        feat, mask = self.inputs
        if feat.shape[1:] != (len(self.slots), self.features.n_features):
            raise ModelCardInvalid(
                f"card input 'features' shape {feat.shape} does not match "
                f"{len(self.slots)} stations x {self.features.n_features} station features"
            )
        if mask.shape[1:] != (len(self.slots),):
            raise ModelCardInvalid(f"card input 'mask' shape {mask.shape} does not match slots")
        if [t.name for t in self.outputs] != ["position_m", "uncertainty"]:
            raise ModelCardInvalid("model card outputs must be position_m, uncertainty")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read a card file."""
        if not path.is_file():
            raise ModelCardInvalid(f"model card {path.name} is missing")
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelCardInvalid(f"model card {path} is unreadable: {exc}") from exc
        return cls.from_dict(data)

    def check_model(self, onnx_path: Path) -> None:
        """Refuse an ONNX file that is not the one this card describes."""
        if not onnx_path.is_file():
            raise ModelCardInvalid(f"model file {onnx_path.name} is missing")
        digest = sha256_file(onnx_path)
        if digest != self.onnx_sha256:
            raise ModelCardInvalid(
                f"model file sha256 {digest[:12]}... does not match the card's "
                f"{self.onnx_sha256[:12]}..."
            )


def _tensor(data: Mapping[str, Any]) -> TensorSpec:
    shape = tuple(None if d is None else int(d) for d in data["shape"])
    return TensorSpec(name=str(data["name"]), shape=shape, dtype=str(data.get("dtype", "float32")))


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
