"""Smoke check of a model before it serves: ``python -m heimdall.smoke ONNX CARD``.

Loads the ONNX file with its card into a :class:`~heimdall.runtime.Localizer`
(the card's digest, tensor names and stations are checked on the way), runs
one simulated request through it and checks that the answer is finite and on
the Earth. Exit status 0 when it serves, 1 with the reason on stderr when not.

The worker's main process runs this in a subprocess before a reload restarts
its pool: an onnxruntime session must never be created in the process that
forks the children, and a model that cannot answer must never replace one that
can.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from heimdall.config import get_settings
from heimdall.iq import decode_request
from heimdall.modelcard import ModelCard, ModelIdentity
from heimdall.simulate.requests import simulated_request
from heimdall.stations import load_network


def check(onnx_path: Path, card_path: Path) -> str:
    """Load the model and answer one request; a one-line summary, or raise why it cannot."""
    from heimdall.runtime import Localizer

    card = ModelCard.load(card_path)
    network = load_network(get_settings().stations_file)
    localizer = Localizer(onnx_path, card, network, ModelIdentity("smoke", "0", None))
    body = simulated_request(20_261_123, 4096, "base64", stations=card.slots)
    decoded = decode_request(
        body,
        stations=card.slots,
        band_mhz=card.band_mhz,
        min_stations=1,
    )
    (answer,) = localizer.predict([decoded])
    values = (answer.latitude, answer.longitude, answer.sigma_e_m, answer.sigma_n_m, answer.rho)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the model answered non-finite values {values}")
    if not (-90 <= answer.latitude <= 90 and answer.sigma_e_m > 0 and answer.sigma_n_m > 0):
        raise ValueError(f"the model answered an impossible localization {values}")
    return f"ok: {answer.latitude:.4f}, {answer.longitude:.4f}"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m heimdall.smoke ONNX CARD", file=sys.stderr)
        return 2
    try:
        print(check(Path(args[0]), Path(args[1])))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
