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

from heimdall import baseline, geo
from heimdall.errors import ModelCardInvalid
from heimdall.features import build_features
from heimdall.iq import DecodedRequest
from heimdall.modelcard import ModelCard, ModelIdentity
from heimdall.stations import Network

STATION_POSITION_TOLERANCE_M = 50.0
"""A receiver moved farther than this since training invalidates the model."""

CONFIDENCES = (0.68, 0.95)
COVERAGE_MARGIN_M = 20_000.0
"""An estimate farther than this outside the stations' convex hull is outside coverage."""
MIN_MISFIT_DB = 1.5
"""Smallest shadowing sigma the covariance model tells apart, dB (the likelihood's smallest)."""
OUTSIDE_UNIT_M = 50_000.0
"""Distance outside the hull over which the covariance grows by ``1 + outside_growth``, m."""


@dataclass(frozen=True)
class CovarianceModel:
    """Heteroscedastic scale of the posterior covariance (the card's ``fusion`` block).

    The variance factor of one estimate is

        scale * (min(misfit, knee) / knee) ** misfit_power
              * (1 + outside_growth * outside / 50 km) ** 2

    ``misfit`` is the shadowing sigma the posterior settled on, dB (how badly
    the powers fit any log-distance explanation; 1.5 dB at best): powers that
    fit well shrink the ellipse, up to the knee it grows with the misfit;
    beyond the knee the posterior's own sigma mixture has already widened it
    as much as the errors grow. ``outside`` is how far the estimate lies beyond
    the stations' hull (0 inside). The numbers are fitted on held-out scene
    families (heimdall.training.calibration).

    The errors are heavier-tailed than the Gaussian of that covariance, so the
    ellipse of each confidence is ``k`` times it with its own calibrated ``k``
    (``ellipse_k``, the card's ``{"0.68": k, "0.95": k}``), not the chi-square
    one; a confidence without a calibrated ``k`` keeps the chi-square ``k``.
    """

    scale: float = 1.0
    misfit_power: float = 0.0
    misfit_knee_db: float = 6.0
    outside_growth: float = 0.0
    ellipse_k: tuple[tuple[float, float], ...] = ()
    """(confidence, k) pairs, ascending confidence (empty: chi-square ellipses)."""

    @classmethod
    def from_fusion(cls, fusion: dict[str, Any]) -> CovarianceModel:
        """Read the card's fusion block (a missing number keeps its neutral value)."""
        ellipse_k = fusion.get("ellipse_k", {})
        return cls(
            scale=float(fusion.get("covariance_scale", 1.0)),
            misfit_power=float(fusion.get("misfit_power", 0.0)),
            misfit_knee_db=float(fusion.get("misfit_knee_db", 6.0)),
            outside_growth=float(fusion.get("outside_growth", 0.0)),
            ellipse_k=tuple(sorted((float(c), float(k)) for c, k in ellipse_k.items())),
        )

    def to_fusion(self) -> dict[str, Any]:
        """The numbers as the card's fusion block stores them (``ellipse_k`` only if fitted)."""
        fusion: dict[str, Any] = {
            "covariance_scale": round(self.scale, 4),
            "misfit_power": round(self.misfit_power, 4),
            "misfit_knee_db": round(self.misfit_knee_db, 4),
            "outside_growth": round(self.outside_growth, 4),
        }
        if self.ellipse_k:
            fusion["ellipse_k"] = {f"{c:g}": round(k, 4) for c, k in self.ellipse_k}
        return fusion

    def ellipse_scale(self, confidence: float) -> float:
        """The k of the ``confidence`` ellipse: calibrated, else the chi-square one."""
        return dict(self.ellipse_k).get(confidence, geo.chi2_scale(confidence))

    def shape(self, hull_distance_m: np.ndarray, misfit_db: np.ndarray) -> np.ndarray:
        """The factor without ``scale``, per estimate."""
        outside = np.maximum(np.asarray(hull_distance_m, dtype=float), 0.0) / OUTSIDE_UNIT_M
        misfit = np.clip(np.asarray(misfit_db, dtype=float), MIN_MISFIT_DB, self.misfit_knee_db)
        return (misfit / self.misfit_knee_db) ** self.misfit_power * (
            1.0 + self.outside_growth * outside
        ) ** 2

    def factor(self, hull_distance_m: np.ndarray, misfit_db: np.ndarray) -> np.ndarray:
        """Variance factor per estimate."""
        return self.scale * self.shape(hull_distance_m, misfit_db)


@dataclass(frozen=True)
class Quality:
    """How far a fix can be trusted, beyond its covariance."""

    inside_coverage: bool
    """The estimate lies within the stations' hull grown by COVERAGE_MARGIN_M and at
    least three stations detected the signal."""
    fit_residual_db: float
    """RMS misfit of the detected powers to the best log-distance explanation, dB
    (0 with fewer than three detections)."""
    detected_stations: tuple[str, ...]
    """Stations whose recording holds the signal (the others bound its power)."""
    hull_distance_m: float
    """Distance of the estimate outside the stations' convex hull, m (negative inside)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "inside_coverage": self.inside_coverage,
            "fit_residual_db": round(self.fit_residual_db, 2),
            "detected_stations": list(self.detected_stations),
            "n_detected": len(self.detected_stations),
            "hull_distance_m": round(self.hull_distance_m, 1),
        }


@dataclass(frozen=True)
class Localization:
    """One estimate: position and its 2-D covariance in the local plane."""

    east_m: float
    north_m: float
    sigma_e_m: float
    sigma_n_m: float
    rho: float
    latitude: float
    longitude: float
    quality: Quality | None = None

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
        self.stations_enu = _slot_enu(card)
        self.likelihood = baseline.LikelihoodParams(**card.fusion.get("likelihood", {}))
        self.covariance_model = CovarianceModel.from_fusion(card.fusion)
        # The coarse search grid and its log-distances to the stations are fixed per model.
        self.grid = baseline.search_grid(self.stations_enu, self.likelihood)
        self.grid_logd = baseline.log_distance(self.grid, self.stations_enu)
        self.prior_scale = float(card.fusion.get("prior_scale", 1.0))
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
        """(B, slots, 3) station features (signal dBm, noise dBm, detected) and (B, slots) mask."""
        xs, masks = [], []
        for req in requests:
            x, mask = build_features(
                req.as_mapping(),
                self.card.slots,
                self.calibration,
                self.card.features,
                req.sample_rate_hz,
            )
            xs.append(x)
            masks.append(mask)
        return np.stack(xs), np.stack(masks)

    def run(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ONNX run: (B, 2) east/north m and (B, 3) sigma_e m, sigma_n m, rho."""
        position, uncertainty = self.session.run(
            ["position_m", "uncertainty"],
            {"features": x.astype(np.float32), "mask": mask.astype(np.float32)},
        )
        return np.asarray(position, dtype=np.float64), np.asarray(uncertainty, dtype=np.float64)

    def estimate(
        self, x: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[baseline.Posterior]]:
        """Network estimate refined by the physical likelihood: (B, 2) m, (B, 2, 2) m^2, posteriors.

        The network's Gaussian, its covariance times the card's ``prior_scale``,
        is the prior of the likelihood posterior on the grid (clean data
        overrule it, noisy data lean on it); the posterior's
        mean and covariance are the answer. The covariance is then scaled by
        :class:`CovarianceModel`, calibrated on held-out scene families.
        """
        position, uncertainty = self.run(x, mask)
        posts = [
            baseline.posterior(
                xi,
                mi,
                self.stations_enu,
                self.likelihood,
                self.grid,
                prior=(p, _covariance(u) * self.prior_scale),
                grid_logd=self.grid_logd,
            )
            for xi, mi, p, u in zip(x, mask, position, uncertainty, strict=True)
        ]
        means = np.array([post.mean_m for post in posts])
        covs = np.array([post.covariance_m2 for post in posts])
        factor = self.covariance_model.factor(
            geo.hull_distance_m(means, self.stations_enu), np.array([p.sigma_db for p in posts])
        )
        return means, covs * factor[:, None, None], posts

    def localize(
        self,
        position: np.ndarray,
        covariance: np.ndarray,
        posts: Sequence[baseline.Posterior],
        mask: np.ndarray,
        x: np.ndarray,
    ) -> list[Localization]:
        """Convert estimates to geodetic localizations with their quality."""
        lat0, lon0 = self.card.origin_latitude, self.card.origin_longitude
        lats, lons = geo.enu_to_geodetic(position[:, 0], position[:, 1], lat0, lon0)
        hull = geo.hull_distance_m(position, self.stations_enu)
        out = []
        for i, (p, c, post) in enumerate(zip(position, covariance, posts, strict=True)):
            detected = tuple(
                sid for j, sid in enumerate(self.card.slots) if mask[i, j] > 0 and x[i, j, 2] > 0
            )
            quality = Quality(
                inside_coverage=bool(hull[i] <= COVERAGE_MARGIN_M and len(detected) >= 3),
                fit_residual_db=post.residual_db,
                detected_stations=detected,
                hull_distance_m=float(hull[i]),
            )
            sx, sy = float(np.sqrt(c[0, 0])), float(np.sqrt(c[1, 1]))
            out.append(
                Localization(
                    east_m=float(p[0]),
                    north_m=float(p[1]),
                    sigma_e_m=sx,
                    sigma_n_m=sy,
                    rho=float(np.clip(c[0, 1] / (sx * sy), -0.999, 0.999)),
                    latitude=float(lats[i]),
                    longitude=float(lons[i]),
                    quality=quality,
                )
            )
        return out

    def predict(self, requests: Sequence[DecodedRequest]) -> list[Localization]:
        """Localize each request; one ONNX run for the whole list."""
        if not requests:
            return []
        x, mask = self.features(requests)
        position, covariance, posts = self.estimate(x, mask)
        return self.localize(position, covariance, posts, mask, x)

    def predict_results(self, requests: Sequence[DecodedRequest]) -> list[dict[str, Any]]:
        """:meth:`predict` as JSON-able result documents, with the time it took."""
        started = time.perf_counter()
        locs = self.predict(requests)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return [
            localization_result(
                loc,
                self.card,
                self.identity,
                inference_time_ms=elapsed_ms / len(locs),
                covariance_model=self.covariance_model,
            )
            for loc in locs
        ]


def _covariance(u: np.ndarray) -> np.ndarray:
    c = u[2] * u[0] * u[1]
    return np.array([[u[0] ** 2, c], [c, u[1] ** 2]])


def _slot_enu(card: ModelCard) -> np.ndarray:
    """(slots, 2) station east/north in the card's plane, m."""
    lat = np.array([float(s["latitude"]) for s in card.stations])
    lon = np.array([float(s["longitude"]) for s in card.stations])
    east, north = geo.geodetic_to_enu(lat, lon, card.origin_latitude, card.origin_longitude)
    return np.stack([np.asarray(east), np.asarray(north)], axis=-1)


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
    covariance_model: CovarianceModel | None = None,
) -> dict[str, Any]:
    """The prediction document returned by the API (position, uncertainty, GeoJSON).

    ``covariance_model`` is the card's (:meth:`CovarianceModel.from_fusion`),
    passed in by a caller that already holds it.
    """
    cov = loc.covariance
    model = covariance_model or CovarianceModel.from_fusion(card.fusion)
    ellipses = [geo.ellipse_from_covariance(cov, c, model.ellipse_scale(c)) for c in CONFIDENCES]
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
                    "scale_k": round(model.ellipse_scale(e.confidence), 4),
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
        "quality": loc.quality.to_dict() if loc.quality is not None else None,
        "model": identity.to_dict(),
        "inference_time_ms": round(inference_time_ms, 3),
    }
