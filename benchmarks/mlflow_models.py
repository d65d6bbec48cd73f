"""What an MLflow user would deploy instead of the service: a pyfunc doing the same work.

:class:`HeimdallPyfunc` takes the predict request bodies as JSON strings
(``{"inputs": ["<request JSON>", ...]}`` posted to ``/invocations``) and
answers their result documents: JSON -> :func:`heimdall.iq.decode_request` ->
features -> ONNX, the project's own functions (:class:`~benchmarks.serving.RequestScorer`).
:func:`save_pyfunc` writes it as an MLflow model folder that
``mlflow models serve -m FOLDER --env-manager local`` serves.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.pyfunc import PythonModel

from heimdall.modelcard import CARD_FILENAME, MODEL_FILENAME
from heimdall.registry import shipped_model_dir


class HeimdallPyfunc(PythonModel):
    """Request JSON strings in, result documents out."""

    def load_context(self, context: Any) -> None:
        """Open the ONNX session of the model folder shipped as the ``model_dir`` artifact."""
        from benchmarks.serving import RequestScorer

        self.scorer = RequestScorer(Path(context.artifacts["model_dir"]))

    # No type hints: MLflow reads them as an input schema and warns about Any.
    def predict(self, context, model_input, params=None):
        """One result document per request string, one ONNX run for the whole input."""
        if hasattr(model_input, "iloc"):  # a DataFrame: its first column
            bodies = [str(v) for v in model_input.iloc[:, 0]]
        else:
            bodies = [str(v) for v in model_input]
        return self.scorer.score_many(bodies)


def save_pyfunc(path: Path, model_dir: Path | None = None) -> Path:
    """Write the pyfunc (with a copy of the shipped ONNX model and card) at ``path``."""
    model_dir = Path(model_dir or shipped_model_dir())
    staging = path.parent / f"{path.name}-artifacts"
    staging.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILENAME, CARD_FILENAME):
        shutil.copy2(model_dir / name, staging / name)
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=HeimdallPyfunc(),
        artifacts={"model_dir": str(staging)},
    )
    return path
