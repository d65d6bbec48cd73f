"""ONNX export of a trained network, its check against torch, and its model card."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from heimdall.features import FeatureParams
from heimdall.modelcard import ModelCard, TensorSpec, sha256_file
from heimdall.simulate.propagation import SimulationParams
from heimdall.stations import Network
from heimdall.training.network import LENGTH_SCALE_M, ExportWrapper, Localizer

OPSET = 17
IR_VERSION = 9
"""onnxruntime 1.31 rejects IR version 14 (what current onnx writes); 9 matches opset 17."""
BAND_HALF_WIDTH_MHZ = 1.0


def export_onnx(
    net: Localizer, covariance_scale: float, path: Path, x: torch.Tensor, mask: torch.Tensor
) -> float:
    """Write the serving graph to ``path``; return the max abs difference ORT vs torch."""
    wrapper = ExportWrapper(net, covariance_scale).eval()
    # The TorchScript exporter writes a plain opset-17 graph without needing
    # onnxscript (the dynamo exporter's dependency); silence its deprecation notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(wrapper, x, mask, path)
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    model.producer_name = "heimdall"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return verify_onnx(wrapper, path, x, mask)


def _export(wrapper: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, path: Path) -> None:
    names = ("features", "mask", "position_m", "uncertainty")
    torch.onnx.export(
        wrapper,
        (x[:2], mask[:2]),
        str(path),
        input_names=["features", "mask"],
        output_names=["position_m", "uncertainty"],
        dynamic_axes={name: {0: "batch"} for name in names},
        opset_version=OPSET,
        dynamo=False,
    )


def verify_onnx(wrapper: torch.nn.Module, path: Path, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference between onnxruntime and torch on the same inputs.

    Compared in the network's own output units (positions and sigmas divided by
    LENGTH_SCALE_M, rho as is): float32 in metres at a 50 km scale cannot agree
    to 1e-4 m, but 1e-4 of the network's unit is 5 m.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(x, mask)]
    got = session.run(None, {"features": x.numpy(), "mask": mask.numpy()})
    unit = np.array([LENGTH_SCALE_M, LENGTH_SCALE_M, 1.0])
    diff_pos = np.abs(got[0] - ref[0]).max() / LENGTH_SCALE_M
    diff_unc = (np.abs(got[1] - ref[1]) / unit).max()
    return float(max(diff_pos, diff_unc))


def write_card(
    out_dir: Path,
    onnx_path: Path,
    network: Network,
    features: FeatureParams,
    mean_db: float,
    std_db: float,
    sim: SimulationParams,
    training: dict[str, Any],
    accuracy: dict[str, Any] | None = None,
    fusion: dict[str, Any] | None = None,
) -> ModelCard:
    """Write ``model_card.json`` describing the ONNX file beside it."""
    lat0, lon0 = network.centroid
    n = len(network.ids)
    card = ModelCard(
        stations=tuple(network.to_dict()["stations"]),  # type: ignore[arg-type]
        features=features,
        normalization_mean_db=round(mean_db, 6),
        normalization_std_db=round(std_db, 6),
        origin_latitude=lat0,
        origin_longitude=lon0,
        band_mhz=(sim.carrier_mhz - BAND_HALF_WIDTH_MHZ, sim.carrier_mhz + BAND_HALF_WIDTH_MHZ),
        inputs=(
            TensorSpec("features", (None, n, features.n_features)),
            TensorSpec("mask", (None, n)),
        ),
        outputs=(TensorSpec("position_m", (None, 2)), TensorSpec("uncertainty", (None, 3))),
        output_units={
            "position_m": "east, north of the origin (network centroid), metres",
            "uncertainty": "sigma_east metres, sigma_north metres, correlation rho (-1..1)",
            "features": "per station: signal power dBm, noise power dBm (in the channel), "
            "detected 0/1; absent stations 0 with mask 0",
        },
        onnx_sha256=sha256_file(onnx_path),
        training=training,
        accuracy=accuracy or {},
        fusion=fusion or {},
    )
    (out_dir / "model_card.json").write_text(card.dumps())
    return card
