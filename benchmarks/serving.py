"""The project's request -> answer computation without a queue, for the reference systems.

:class:`RequestScorer` is what the no-queue reference (:mod:`benchmarks.noqueue`),
the MLflow pyfunc (:mod:`benchmarks.mlflow_models`) and the in-process compute
floor all run: parse the request JSON, decode and validate it with
:func:`heimdall.iq.decode_request` against the model card, build the features,
one ONNX run, the result documents. The same functions the service's API and
workers call, only in one process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heimdall.iq import DecodedRequest, decode_request
from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME, ModelCard, ModelIdentity
from heimdall.registry import shipped_model_dir
from heimdall.runtime import Localizer
from heimdall.stations import load_network

MIN_STATIONS = 3
"""The service's default ``min_stations``."""


class RequestScorer:
    """One onnxruntime session (1 intra-op thread) and the card of a model folder."""

    def __init__(self, model_dir: Path | None = None) -> None:
        model_dir = Path(model_dir or shipped_model_dir())
        self.card = ModelCard.load(model_dir / CARD_FILENAME)
        self.localizer = Localizer(
            model_dir / MODEL_FILENAME,
            self.card,
            load_network(),
            ModelIdentity("heimdall-localizer", "reference", None),
        )

    def decode(self, payload: Any) -> DecodedRequest:
        """Validate and decode one predict request body (already parsed JSON)."""
        return decode_request(
            payload,
            stations=self.card.slots,
            band_mhz=self.card.band_mhz,
            min_stations=MIN_STATIONS,
        )

    def score(self, body: bytes | str) -> dict[str, Any]:
        """One request body (JSON text) -> its result document."""
        return self.localizer.predict_results([self.decode(json.loads(body))])[0]

    def score_many(self, bodies: Sequence[bytes | str]) -> list[dict[str, Any]]:
        """Many request bodies -> their result documents, one ONNX run for all."""
        decoded = [self.decode(json.loads(b)) for b in bodies]
        return self.localizer.predict_results(decoded)
