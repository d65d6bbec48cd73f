"""Error hierarchy of the domain core.

Every error knows the HTTP status it maps to and a stable ``type`` slug, so the
API can render one problem document for all of them without knowing the
conditions one by one. The core itself never speaks HTTP: the status is data.
"""

from __future__ import annotations

from typing import Any

MAX_DETAIL_CHARS = 1_000
"""Longest ``detail`` a problem document carries; longer ones are cut (they quote client input)."""

MAX_QUOTED_CHARS = 200
"""Longest ``field`` or other string member of a problem (a station id, a path), same reason."""


def bounded(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was left out.

    Problem documents quote what the client sent (a station id, a key, a
    content type); a client that sends a megabyte there must not get it echoed
    back, nor fill the logs with it.
    """
    if len(text) <= limit:
        return text
    marker = f"... ({len(text)} characters, cut)"
    return text[: max(0, limit - len(marker))] + marker


def bounded_problem(problem: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``problem`` whose ``detail`` and other string members are bounded."""
    body: dict[str, Any] = {}
    for key, value in problem.items():
        if isinstance(value, str):
            value = bounded(value, MAX_DETAIL_CHARS if key == "detail" else MAX_QUOTED_CHARS)
        body[key] = value
    return body


class HeimdallError(Exception):
    """Base of every error the service reports to a client."""

    status: int = 500
    type: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        detail = bounded(detail, MAX_DETAIL_CHARS)
        super().__init__(detail)
        self.detail = detail
        self.field = None if field is None else bounded(field, MAX_QUOTED_CHARS)
        self.extra = {
            key: bounded(value, MAX_QUOTED_CHARS) if isinstance(value, str) else value
            for key, value in extra.items()
        }

    def to_problem(self) -> dict[str, Any]:
        """Problem document (RFC 9457 shape) describing this error."""
        body: dict[str, Any] = {
            "type": f"urn:heimdall:problem:{self.type}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


class InvalidRequest(HeimdallError):
    """The request body is not the JSON document the endpoint expects."""

    status = 400
    type = "invalid-request"
    title = "Invalid request"


class UnsupportedMediaType(HeimdallError):
    """The request body is not JSON."""

    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class PayloadTooLarge(HeimdallError):
    """The request body, or a batch, exceeds a configured limit."""

    status = 413
    type = "payload-too-large"
    title = "Payload too large"


class InvalidInput(HeimdallError):
    """Well-formed JSON whose content cannot be used (bad IQ, bad parameters)."""

    status = 422
    type = "invalid-input"
    title = "Invalid input"


class InvalidIQ(InvalidInput):
    """One station's IQ recording cannot be decoded or fails validation."""

    type = "invalid-iq"
    title = "Invalid IQ recording"


class UnknownStation(InvalidInput):
    """A receiver id that the model's network does not contain."""

    type = "unknown-station"
    title = "Unknown station"


class DuplicateStation(InvalidInput):
    """The same receiver appears twice in one request."""

    type = "duplicate-station"
    title = "Duplicate station"


class SampleRateMismatch(InvalidInput):
    """The recordings' sample rate is not the one the model was trained on."""

    type = "sample-rate-mismatch"
    title = "Sample rate mismatch"


class FrequencyOutOfBand(InvalidInput):
    """The carrier frequency lies outside the band the model was trained on."""

    type = "frequency-out-of-band"
    title = "Frequency out of band"


class TooFewStations(InvalidInput):
    """Fewer receivers than localization needs."""

    type = "too-few-stations"
    title = "Too few stations"


class JobNotFound(HeimdallError):
    """No job with that id is known."""

    status = 404
    type = "job-not-found"
    title = "Job not found"


class ModelUnavailable(HeimdallError):
    """No usable model could be resolved or loaded."""

    status = 503
    type = "model-unavailable"
    title = "Model unavailable"


class ModelCardInvalid(ModelUnavailable):
    """A registered model whose card is missing or contradicts the model."""

    type = "model-card-invalid"
    title = "Model card invalid"


class ServiceUnavailable(HeimdallError):
    """A dependency (Redis, the workers) does not answer."""

    status = 503
    type = "service-unavailable"
    title = "Service unavailable"
