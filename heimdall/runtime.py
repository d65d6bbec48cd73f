"""Inference: decoded requests -> features -> ONNX -> localizations.

A :class:`Localizer` owns one onnxruntime session and the card that describes
it. Create it inside the process that uses it (a worker child after the fork),
never in a parent that forks. It is transport-free: tasks, tests, the CLI
and benchmarks all call :meth:`Localizer.predict`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from heimdall import geo
from heimdall.errors import ModelCardInvalid
from heimdall.features import build_features, normalize
from heimdall.iq import DecodedRequest
from heimdall.modelcard import ModelCard, ModelIdentity
from heimdall.stations import Network

STATION_POSITION_TOLERANCE_M = 50.0
"""A receiver moved farther than this since training invalidates the model."""

CONFIDENCES = (0.68, 0.95)


@dataclass(frozen=True)
class Localization:
    """One estimate: position and 2-D Gaussian uncertainty in the local plane."""

    east_m: float
    north_m: float
    sigma_e_m: float
    sigma_n_m: float
    rho: float
    latitude: float
    longitude: float

    @property
    def covariance(self) -> np.ndarray:
        """2x2 east/north covariance, m^2."""
        return geo.covariance_from_params(self.sigma_e_m, self.sigma_n_m, self.rho)


class Localizer:
    """An onnxruntime session plus the card and network it serves."""

    def __init__(
        self,
        onnx_path: Path,
        card: ModelCard,
        network: Network,
        identity: ModelIdentity,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        card.check_model(onnx_path)
        self.card = card
        self.identity = identity
        self.calibration = _serving_calibration(card, network)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in self.session.get_inputs()]
        if names != [t.name for t in card.inputs]:
            raise ModelCardInvalid(f"ONNX inputs {names} differ from the card's")

    def features(self, requests: Sequence[DecodedRequest]) -> tuple[np.ndarray, np.ndarray]:
        """Normalized (B, slots, mels) features and (B, slots) mask for requests."""
        xs, masks = [], []
        for req in requests:
            x, mask = build_features(
                req.as_mapping(), self.card.slots, self.calibration, self.card.features
            )
            xs.append(x)
            masks.append(mask)
        x = np.stack(xs)
        mask = np.stack(masks)
        x = normalize(x, mask, self.card.normalization_mean_db, self.card.normalization_std_db)
        return x, mask

    def run(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ONNX run: (B, 2) east/north m and (B, 3) sigma_e m, sigma_n m, rho."""
        position, uncertainty = self.session.run(
            ["position_m", "uncertainty"],
            {"features": x.astype(np.float32), "mask": mask.astype(np.float32)},
        )
        return np.asarray(position, dtype=np.float64), np.asarray(uncertainty, dtype=np.float64)

    def localize(self, position: np.ndarray, uncertainty: np.ndarray) -> list[Localization]:
        """Convert model outputs to geodetic localizations."""
        lat0, lon0 = self.card.origin_latitude, self.card.origin_longitude
        lats, lons = geo.enu_to_geodetic(position[:, 0], position[:, 1], lat0, lon0)
        return [
            Localization(
                east_m=float(p[0]),
                north_m=float(p[1]),
                sigma_e_m=float(u[0]),
                sigma_n_m=float(u[1]),
                rho=float(u[2]),
                latitude=float(lat),
                longitude=float(lon),
            )
            for p, u, lat, lon in zip(position, uncertainty, lats, lons, strict=True)
        ]

    def predict(self, requests: Sequence[DecodedRequest]) -> list[Localization]:
        """Localize each request; one ONNX run for the whole list."""
        if not requests:
            return []
        x, mask = self.features(requests)
        return self.localize(*self.run(x, mask))

    def predict_results(self, requests: Sequence[DecodedRequest]) -> list[dict[str, Any]]:
        """:meth:`predict` as JSON-able result documents, with the time it took."""
        started = time.perf_counter()
        locs = self.predict(requests)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return [
            localization_result(
                loc, self.card, self.identity, inference_time_ms=elapsed_ms / len(locs)
            )
            for loc in locs
        ]


def _serving_calibration(card: ModelCard, network: Network) -> dict[str, float]:
    """Calibration in force: the operator's network file, for stations the model knows.

    A receiver's gain may be re-measured without retraining (the model works in
    dBm), but a receiver that moved invalidates the model.
    """
    calibration = {}
    for st in card.stations:
        sid = str(st["id"])
        if sid not in network:
            raise ModelCardInvalid(f"model slot {sid!r} is not in the receiver network file")
        current = network.get(sid)
        east, north = geo.geodetic_to_enu(
            current.latitude, current.longitude, float(st["latitude"]), float(st["longitude"])
        )
        moved_m = float(np.hypot(east, north))
        if moved_m > STATION_POSITION_TOLERANCE_M:
            raise ModelCardInvalid(
                f"station {sid!r} is {moved_m:.0f} m from where the model was "
                "trained; retrain the model for the new network"
            )
        calibration[sid] = current.calibration_db
    return calibration


def localization_result(
    loc: Localization,
    card: ModelCard,
    identity: ModelIdentity,
    *,
    inference_time_ms: float,
) -> dict[str, Any]:
    """The prediction document returned by the API (position, uncertainty, GeoJSON)."""
    cov = loc.covariance
    ellipses = [geo.ellipse_from_covariance(cov, c) for c in CONFIDENCES]
    return {
        "position": {"latitude": round(loc.latitude, 7), "longitude": round(loc.longitude, 7)},
        "position_enu_m": {"east": round(loc.east_m, 2), "north": round(loc.north_m, 2)},
        "uncertainty": {
            "sigma_x_m": round(loc.sigma_e_m, 2),
            "sigma_y_m": round(loc.sigma_n_m, 2),
            "covariance_xy_m2": round(loc.rho * loc.sigma_e_m * loc.sigma_n_m, 2),
            "rho": round(loc.rho, 5),
            "theta_deg": round(geo.theta_deg(cov), 3),
            "ellipses": [
                {
                    "confidence": e.confidence,
                    "semi_major_m": round(e.semi_major_m, 2),
                    "semi_minor_m": round(e.semi_minor_m, 2),
                    "orientation_deg": round(e.orientation_deg, 3),
                }
                for e in ellipses
            ],
        },
        "geojson": geo.localization_geojson(
            loc.latitude,
            loc.longitude,
            ellipses,
            center_enu=(loc.east_m, loc.north_m),
            origin=(card.origin_latitude, card.origin_longitude),
        ),
        "model": identity.to_dict(),
        "inference_time_ms": round(inference_time_ms, 3),
    }
