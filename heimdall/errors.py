"""Error hierarchy of the domain core.

Every error knows the HTTP status it maps to and a stable ``type`` slug, so the
API can render one problem document for all of them without knowing the
conditions one by one. The core itself never speaks HTTP: the status is data.
"""

from __future__ import annotations

from typing import Any


class HeimdallError(Exception):
    """Base of every error the service reports to a client."""

    status: int = 500
    type: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra

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
