"""Smoke check of models before they serve: ``python -m heimdall.smoke ONNX CARD [ONNX CARD ...]``.

Loads each ONNX file with its card into a :class:`~heimdall.runtime.Localizer`
on the receiver network in force (the card's digest, tensor names and
stations are checked on the way), then runs one known simulated request
through it and checks that the answer is finite, on the Earth, and within the
card's recorded tolerance of the answer recorded when the version was
registered (:func:`reference_answer`). The known input and its answer depend
on the model and its card only (the network the card describes, its
calibration), never on this host's network file, so a re-measured receiver
gain does not make a good version look broken. Prints one line
per model (``ok: ...`` or ``refused: <reason>``); exit status 0 when every
model serves, 1 when any does not.

The worker's main process runs this in a subprocess before a reload restarts
its pool: an onnxruntime session must never be created in the process that
forks the children, and a model that cannot answer must never replace one that
can.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from heimdall import geo
from heimdall.config import get_settings
from heimdall.iq import decode_request
from heimdall.modelcard import ModelCard, ModelIdentity
from heimdall.simulate.requests import simulated_request
from heimdall.stations import Network, load_network, network_from_dict

if TYPE_CHECKING:  # onnxruntime is imported only where a session is built
    from heimdall.runtime import Localization

KNOWN_SEED = 20_261_123
"""Scene of the known input every version is checked against."""
KNOWN_SAMPLES = 4096
REFERENCE_TOLERANCE_M = 100.0
"""How far a version's answer to the known input may move from its recorded one, metres
(onnxruntime builds differ in the last float32 bits; a different model moves by km)."""


def card_network(card: ModelCard) -> Network:
    """The receiver network a card describes (positions and calibration it was trained with)."""
    return network_from_dict({"network": "model card", "stations": list(card.stations)})


def known_answer(onnx_path: Path, card: ModelCard) -> Localization:
    """The model's answer to the known input, on the card's own network (this process's session)."""
    from heimdall.runtime import Localizer

    network = card_network(card)
    localizer = Localizer(onnx_path, card, network, ModelIdentity("smoke", "0", None))
    body = simulated_request(
        KNOWN_SEED, KNOWN_SAMPLES, "base64", stations=card.slots, network=network
    )
    decoded = decode_request(body, stations=card.slots, band_mhz=card.band_mhz, min_stations=1)
    (answer,) = localizer.predict([decoded])
    values = (answer.latitude, answer.longitude, answer.sigma_e_m, answer.sigma_n_m, answer.rho)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the model answered non-finite values {values}")
    if not (-90 <= answer.latitude <= 90 and answer.sigma_e_m > 0 and answer.sigma_n_m > 0):
        raise ValueError(f"the model answered an impossible localization {values}")
    return answer


def reference_answer(onnx_path: Path, card: ModelCard) -> dict[str, Any]:
    """What to record in the card at registration: the known input and the answer to it."""
    answer = known_answer(onnx_path, card)
    return {
        "seed": KNOWN_SEED,
        "n_samples": KNOWN_SAMPLES,
        "latitude": round(answer.latitude, 7),
        "longitude": round(answer.longitude, 7),
        "tolerance_m": REFERENCE_TOLERANCE_M,
    }


def distance_m(lat: float, lon: float, ref_lat: float, ref_lon: float) -> float:
    """Distance between two nearby points, metres (local tangent plane)."""
    east, north = geo.geodetic_to_enu(lat, lon, ref_lat, ref_lon)
    return float(np.hypot(east, north))


def check(onnx_path: Path, card_path: Path) -> str:
    """Load the model and answer the known input; a one-line summary, or raise why it cannot."""
    from heimdall.runtime import Localizer

    card = ModelCard.load(card_path)
    # Serves on the network in force (a receiver moved since training refuses it).
    Localizer(
        onnx_path,
        card,
        load_network(get_settings().stations_file),
        ModelIdentity("smoke", "0", None),
    )
    answer = known_answer(onnx_path, card)
    summary = f"{answer.latitude:.4f}, {answer.longitude:.4f}"
    reference = card.reference
    if not reference:
        return f"ok: {summary} (no recorded answer to compare with)"
    if (reference.get("seed"), reference.get("n_samples")) != (KNOWN_SEED, KNOWN_SAMPLES):
        raise ValueError(f"the card records the answer to another input: {reference}")
    off = distance_m(
        answer.latitude,
        answer.longitude,
        float(reference["latitude"]),
        float(reference["longitude"]),
    )
    tolerance = float(reference.get("tolerance_m", REFERENCE_TOLERANCE_M))
    if not off <= tolerance:
        raise ValueError(
            f"the known input is answered {off:.0f} m from the answer recorded in the card "
            f"(tolerance {tolerance:g} m)"
        )
    return f"ok: {summary}, {off:.1f} m from the recorded answer"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) % 2:
        print("usage: python -m heimdall.smoke ONNX CARD [ONNX CARD ...]", file=sys.stderr)
        return 2
    status = 0
    for onnx_path, card_path in zip(args[::2], args[1::2], strict=True):
        try:
            print(check(Path(onnx_path), Path(card_path)), flush=True)
        except Exception as exc:
            print(f"refused: {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
