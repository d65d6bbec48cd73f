"""Scene families: the training distribution and the shifted ones the model is judged on.

``training`` is what the network learns from. The served covariance is
calibrated on :data:`CALIBRATION_FAMILIES`, families the network never saw:
``calibration`` (a different terrain spectrum, stronger station errors,
log-distance only), ``calibration-smooth`` (the same with little shadowing, so
the fit learns how far ellipses may shrink on good data), and the
``second-law``, ``outside`` and ``sparse`` shifts drawn with the calibration
seeds. The evaluation families are judged with their own seed
(heimdall.evaluation.EVAL_SEED), never fitted on: ``second-law`` is an
independently written propagation family (two-ray breakpoint law, rough
exponential-spectrum terrain with short correlation), the others stress one
nuisance each.
"""

from __future__ import annotations

from heimdall.simulate.propagation import SimulationParams

TRAINING = SimulationParams()

CALIBRATION = TRAINING.but(
    laws=("log-distance",),
    terrain_kernel="exponential",
    terrain_sigma_db=(3.0, 10.0),
    station_bias_db=2.5,
)

CALIBRATION_SMOOTH = CALIBRATION.but(
    terrain_sigma_db=(0.5, 2.0),
    station_bias_db=0.5,
    rician_k_db=(10.0, 20.0),
)

EVALUATION: dict[str, SimulationParams] = {
    "held-out": TRAINING,
    "second-law": TRAINING.but(
        laws=("dual-slope",),
        exponent_min=3.0,
        exponent_max=4.5,
        terrain_kernel="exponential",
        terrain_sigma_db=(5.0, 9.0),
        terrain_correlation_km=(1.0, 8.0),
    ),
    "clean": TRAINING.but(
        laws=("log-distance",),
        terrain_sigma_db=(1.0, 1.0),
        station_bias_db=0.0,
        rician_k_db=(20.0, 20.0),
    ),
    "sparse": TRAINING.but(min_stations=3, max_stations=4),
    "outside": TRAINING.but(inside_fraction=0.0, outside_min_km=30.0, outside_km=100.0),
    "fading": TRAINING.but(rician_k_db=(-20.0, -10.0)),
}
"""Evaluation families by name; the noisy ones are all but ``clean``."""

NOISY = ("held-out", "second-law", "sparse", "outside", "fading")

CALIBRATION_FAMILIES: dict[str, SimulationParams] = {
    "calibration": CALIBRATION,
    "calibration-smooth": CALIBRATION_SMOOTH,
    "second-law": EVALUATION["second-law"],
    "outside": EVALUATION["outside"],
    "sparse": EVALUATION["sparse"],
}
"""Families the served covariance is fitted on (with seeds the evaluation never uses)."""
