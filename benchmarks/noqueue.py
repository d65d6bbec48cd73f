"""No-queue reference: the project's decode + features + ONNX inside a plain Flask view.

``gunicorn -w 2 benchmarks.noqueue:app`` (sync workers): what this hardware
allows without a broker, a result backend or a cache in the way. Each gunicorn
worker builds its own :class:`~benchmarks.serving.RequestScorer` on its first
request (after the fork, so no onnxruntime session crosses it).
"""

from __future__ import annotations

from flask import Flask, Response, request

from benchmarks.serving import RequestScorer
from heimdall.errors import HeimdallError

app = Flask(__name__)
_scorer: RequestScorer | None = None


def scorer() -> RequestScorer:
    """This process's scorer, built on first use."""
    global _scorer
    if _scorer is None:
        _scorer = RequestScorer()
    return _scorer


@app.post("/predict")
def predict() -> Response | tuple[dict[str, object], int]:
    """One predict request body -> its result document (400 on invalid input)."""
    try:
        return Response(
            app.json.dumps(scorer().score(request.get_data())), mimetype="application/json"
        )
    except HeimdallError as exc:
        return exc.to_problem(), 400


@app.get("/health")
def health() -> dict[str, str]:
    """Liveness, and a way to build the scorer before the measurement."""
    scorer()
    return {"status": "ok"}
