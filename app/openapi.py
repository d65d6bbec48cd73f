"""The API's OpenAPI 3.1 description (``/openapi.json``) and a readable page of it (``/docs``).

The document is written by hand next to the views it describes; a test checks
that every ``/api/v1`` route in the app's URL map appears in it. ``/docs`` is
rendered on the server from the same document, with no script or stylesheet
from elsewhere: the service may run where there is no internet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, render_template_string

from app.docs_template import DOCS_TEMPLATE
from app.services import services
from heimdall.config import Settings
from heimdall.errors import HeimdallError
from heimdall.iq import (
    MAX_ABS_SAMPLE,
    MAX_SAMPLE_RATE_HZ,
    MAX_SAMPLES,
    MIN_SAMPLE_RATE_HZ,
    MIN_SAMPLES,
)
from heimdall.stations import load_network

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"

REQUEST_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
JOB_ID_PATTERN = "^[A-Za-z0-9-]{1,64}$"
_B64 = "[A-Za-z0-9+/]"
BASE64_COMPLEX64_PATTERN = f"^(?:{_B64}{{32}})*(?:{_B64}{{11}}=|{_B64}{{22}}==)?$"
"""base64 of a whole number of complex64 samples (8 bytes each): 3 samples are
32 characters, a remainder of 1 or 2 samples ends in ``=`` or ``==``."""


def _base64_length(n_bytes: int) -> int:
    return 4 * -(-n_bytes // 3)


@dataclass(frozen=True)
class Contract:
    """What the served model accepts, as the validation enforces it (``heimdall.iq``)."""

    stations: tuple[str, ...]
    sample_rate_hz: float | None
    band_mhz: tuple[float, float] | None


def served_contract() -> Contract:
    """The served model's stations, sample rate and band; the network's stations if none loads."""
    svc = services()
    try:
        card = svc.model.current().card
    except HeimdallError:
        return Contract(load_network(svc.settings.stations_file).ids, None, None)
    return Contract(card.slots, card.features.sample_rate_hz, card.band_mhz)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _json_content(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _schemas(settings: Settings, contract: Contract) -> dict[str, Any]:
    number = {"type": "number"}
    sample = {"type": "number", "minimum": -MAX_ABS_SAMPLE, "maximum": MAX_ABS_SAMPLE}
    sample_rate: dict[str, Any] = {
        "type": "number",
        "minimum": MIN_SAMPLE_RATE_HZ,
        "maximum": MAX_SAMPLE_RATE_HZ,
        "description": (
            f"Rate of the recordings, {MIN_SAMPLE_RATE_HZ:.0f} to {MAX_SAMPLE_RATE_HZ:.0f} Hz; "
            "they are band-limited and resampled to the model's rate."
        ),
    }
    frequency: dict[str, Any] = {
        "type": "number",
        "description": "Carrier, MHz; must lie in the model's band (default: its centre).",
    }
    if contract.band_mhz is not None:
        frequency["minimum"], frequency["maximum"] = contract.band_mhz
    return {
        "Receiver": {
            "type": "object",
            "description": (
                "One station's complex-baseband recording (absolute scale, dBFS). Each "
                "station may appear once per request."
            ),
            "required": ["station", "iq"],
            "properties": {
                "station": {
                    "type": "string",
                    "enum": list(contract.stations),
                    "description": "Receiver id of the served model's network.",
                },
                "iq": {
                    "description": (
                        f"{MIN_SAMPLES} to {MAX_SAMPLES} samples at the model's sample rate, "
                        f"finite, |I| and |Q| at most {MAX_ABS_SAMPLE:g} (full scale is 1): "
                        "[I, Q] pairs, or base64 of little-endian complex64 (float32 I, Q)."
                    ),
                    "oneOf": [
                        {
                            "type": "array",
                            "minItems": MIN_SAMPLES,
                            "maxItems": MAX_SAMPLES,
                            "items": {
                                "type": "array",
                                "prefixItems": [sample, sample],
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        },
                        {
                            "type": "string",
                            "contentEncoding": "base64",
                            "pattern": BASE64_COMPLEX64_PATTERN,
                            "minLength": _base64_length(8 * MIN_SAMPLES),
                            "maxLength": _base64_length(8 * MAX_SAMPLES),
                        },
                    ],
                },
            },
        },
        "PredictRequest": {
            "type": "object",
            "description": "Unknown top-level keys are ignored.",
            "required": ["receivers", "sample_rate_hz"],
            "properties": {
                "receivers": {
                    "type": "array",
                    "minItems": settings.min_stations,
                    "maxItems": len(contract.stations),
                    "items": _ref("Receiver"),
                },
                "sample_rate_hz": sample_rate,
                "frequency_mhz": frequency,
            },
            "additionalProperties": True,
        },
        "Position": {
            "type": "object",
            "required": ["latitude", "longitude"],
            "properties": {
                "latitude": {"type": "number", "description": "WGS84, degrees."},
                "longitude": {"type": "number", "description": "WGS84, degrees."},
            },
        },
        "Ellipse": {
            "type": "object",
            "properties": {
                "confidence": {"type": "number", "examples": [0.68, 0.95]},
                "semi_major_m": number,
                "semi_minor_m": number,
                "orientation_deg": {
                    "type": "number",
                    "description": "Major axis, degrees clockwise from north.",
                },
            },
        },
        "Uncertainty": {
            "type": "object",
            "properties": {
                "sigma_x_m": {"type": "number", "description": "East standard deviation, m."},
                "sigma_y_m": {"type": "number", "description": "North standard deviation, m."},
                "covariance_xy_m2": {"type": "number", "description": "East/north covariance."},
                "rho": {"type": "number", "description": "Correlation coefficient."},
                "theta_deg": number,
                "ellipses": {"type": "array", "items": _ref("Ellipse")},
            },
        },
        "ModelIdentity": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "alias": {"type": ["string", "null"]},
            },
        },
        "Localization": {
            "type": "object",
            "description": "A worker's answer for one request.",
            "required": ["position", "uncertainty", "model"],
            "properties": {
                "position": _ref("Position"),
                "position_enu_m": {
                    "type": "object",
                    "description": "East/north of the network centroid, m.",
                    "properties": {"east": number, "north": number},
                },
                "uncertainty": _ref("Uncertainty"),
                "geojson": {
                    "type": "object",
                    "description": "FeatureCollection: the estimate and one polygon per ellipse.",
                },
                "quality": {
                    "type": "object",
                    "description": "How far the fix can be trusted (see docs/model.md).",
                    "properties": {
                        "inside_coverage": {"type": "boolean"},
                        "fit_residual_db": number,
                        "detected_stations": {"type": "array", "items": {"type": "string"}},
                        "n_detected": {"type": "integer"},
                        "hull_distance_m": number,
                    },
                },
                "model": _ref("ModelIdentity"),
                "inference_time_ms": number,
            },
        },
        "PredictResponse": {
            "allOf": [
                _ref("Localization"),
                {
                    "type": "object",
                    "required": ["cached", "request_id", "job_id"],
                    "properties": {
                        "cached": {"type": "boolean"},
                        "request_id": {"type": "string"},
                        "job_id": {
                            "type": ["string", "null"],
                            "description": "Null when answered from the cache.",
                        },
                    },
                },
            ]
        },
        "Stations": {
            "type": "object",
            "required": ["model", "sample_rate_hz", "band_mhz", "min_stations", "stations"],
            "properties": {
                "model": _ref("ModelIdentity"),
                "sample_rate_hz": number,
                "band_mhz": {"type": "array", "items": number, "minItems": 2, "maxItems": 2},
                "min_stations": {"type": "integer"},
                "stations": {
                    "type": "array",
                    "description": "In the model's slot order.",
                    "items": {
                        "type": "object",
                        "required": ["id", "latitude", "longitude", "calibration_db"],
                        "properties": {
                            "id": {"type": "string"},
                            "name": {"type": "string"},
                            "latitude": number,
                            "longitude": number,
                            "altitude_m": number,
                            "calibration_db": {
                                **number,
                                "description": "received dBm = IQ power in dBFS + this.",
                            },
                        },
                    },
                },
            },
        },
        "JobAccepted": {
            "type": "object",
            "required": ["job_id", "status", "status_url"],
            "properties": {
                "job_id": {"type": "string"},
                "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
                "status_url": {"type": "string", "format": "uri-reference"},
                "request_id": {"type": "string"},
            },
        },
        "Job": {
            "type": "object",
            "required": ["job_id", "status"],
            "properties": {
                "job_id": {"type": "string"},
                "kind": {"type": "string", "enum": ["predict", "batch"]},
                "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
                "request_id": {"type": ["string", "null"]},
                "created_at": {"type": ["number", "null"], "description": "Epoch seconds."},
                "result": {
                    "description": "When succeeded: a Localization (predict) or BatchResponse.",
                    "oneOf": [_ref("Localization"), _ref("BatchResponse")],
                },
                "problem": _ref("Problem"),
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["items"],
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_batch_items,
                    "items": {
                        "description": (
                            "A PredictRequest. With continue_on_error (the default) any "
                            "value is taken and an invalid one becomes that item's problem; "
                            "without it, the first invalid item fails the whole request."
                        ),
                    },
                },
                "continue_on_error": {
                    "type": "boolean",
                    "default": True,
                    "description": (
                        "true: invalid items become per-item problems; false: the first "
                        "invalid item fails the whole request (field names items[i])."
                    ),
                },
            },
        },
        "BatchItem": {
            "type": "object",
            "required": ["index", "status", "cached"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "status": {"type": "string", "enum": ["ok", "error"]},
                "result": _ref("Localization"),
                "problem": _ref("Problem"),
                "cached": {"type": "boolean"},
            },
        },
        "BatchResponse": {
            "type": "object",
            "required": ["items", "counts"],
            "properties": {
                "items": {"type": "array", "items": _ref("BatchItem")},
                "counts": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer"},
                        "succeeded": {"type": "integer"},
                        "failed": {"type": "integer"},
                        "cached": {"type": "integer"},
                    },
                },
                "elapsed_ms": {"type": ["number", "null"]},
                "request_id": {"type": ["string", "null"]},
                "job_id": {"type": ["string", "null"]},
            },
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details.",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "examples": ["urn:heimdall:problem:invalid-iq"]},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "field": {
                    "type": "string",
                    "description": "Where in the request, e.g. receivers[2].iq or items[3].",
                },
                "request_id": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"type": "string", "const": "ok"}},
        },
        "Ready": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "const": "ready"},
                "redis": {"type": "string"},
                "broker": {"type": "string"},
                "model": {"oneOf": [_ref("ModelIdentity"), {"type": "null"}]},
                "workers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "hostname": {"type": "string"},
                            "model": {"oneOf": [_ref("ModelIdentity"), {"type": "null"}]},
                            "error": {"type": ["string", "null"]},
                            "children": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
                "loaded_children": {"type": "integer"},
                "model_versions": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


def _operation(
    summary: str,
    description: str,
    responses: dict[str, Any],
    *,
    tag: str,
    operation_id: str,
    request_schema: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [tag],
        "summary": summary,
        "description": description,
        "operationId": operation_id,
        "responses": responses,
    }
    if parameters:
        op["parameters"] = parameters
    if request_schema:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(request_schema)}},
        }
    return op


def build_spec(settings: Settings, contract: Contract) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this service under ``settings`` (limits, timeouts).

    ``contract`` fills in what the served model accepts: its stations, sample
    rate and band.
    """
    request_id = {"$ref": "#/components/parameters/RequestId"}
    timeout = {"$ref": "#/components/parameters/Timeout"}
    accepted = {
        "description": "Queued (or still running when the wait ran out); poll status_url.",
        "headers": {
            "Location": {"description": "The job URL.", "schema": {"type": "string"}},
            "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
        },
        "content": _json_content(_ref("JobAccepted")),
    }
    client_errors = {
        "400": _response("BadRequest"),
        "413": _response("PayloadTooLarge"),
        "415": _response("UnsupportedMediaType"),
        "422": _response("Unprocessable"),
        "500": _response("InternalError"),
        "503": _response("ServiceUnavailable"),
    }
    ok_headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    paths: dict[str, Any] = {
        "/api/v1/predict": {
            "post": _operation(
                "Localize a transmitter",
                "Validates the recordings against the served model, answers from the cache "
                "when the same input was seen by the same model version, otherwise runs it "
                f"on a worker and waits up to {settings.predict_timeout_s:g} s (or `timeout`). "
                "When the wait runs out the answer is 202 and the job goes on.",
                {
                    "200": {
                        "description": "The localization.",
                        "headers": ok_headers,
                        "content": _json_content(_ref("PredictResponse")),
                    },
                    "202": accepted,
                    **client_errors,
                },
                tag="predict",
                operation_id="predict",
                request_schema="PredictRequest",
                parameters=[timeout, request_id],
            )
        },
        "/api/v1/predict/async": {
            "post": _operation(
                "Queue a localization",
                "Validates like /predict, then returns a job at once.",
                {"202": accepted, **client_errors},
                tag="predict",
                operation_id="predictAsync",
                request_schema="PredictRequest",
                parameters=[request_id],
            )
        },
        "/api/v1/predict/batch": {
            "post": _operation(
                "Localize many transmitters",
                f"At most {settings.max_batch_items} items (413 above, 422 when empty). "
                "Cached items are answered from the cache; the rest run in chunks of "
                f"{settings.batch_chunk_size} (one model run per chunk). Items come back "
                "in request order.",
                {
                    "200": {
                        "description": "One entry per item, in request order.",
                        "headers": ok_headers,
                        "content": _json_content(_ref("BatchResponse")),
                    },
                    "202": accepted,
                    **client_errors,
                },
                tag="batch",
                operation_id="predictBatch",
                request_schema="BatchRequest",
                parameters=[timeout, request_id],
            )
        },
        "/api/v1/predict/batch/async": {
            "post": _operation(
                "Queue a batch",
                "Validates like /predict/batch, then returns the batch job at once.",
                {"202": accepted, **client_errors},
                tag="batch",
                operation_id="predictBatchAsync",
                request_schema="BatchRequest",
                parameters=[request_id],
            )
        },
        "/api/v1/stations": {
            "get": _operation(
                "The receiver network",
                "The served model's stations in slot order with each one's dBFS -> dBm "
                "calibration in force, the sample rate, the band and the minimum number of "
                "stations: what a client needs to build a valid request.",
                {
                    "200": {
                        "description": "The network.",
                        "headers": ok_headers,
                        "content": _json_content(_ref("Stations")),
                    },
                    "503": _response("ServiceUnavailable"),
                },
                tag="predict",
                operation_id="getStations",
                parameters=[request_id],
            )
        },
        "/api/v1/jobs/{job_id}": {
            "get": _operation(
                "Poll a job",
                "queued | running | succeeded (with result) | failed (with problem). "
                f"Jobs are kept {settings.result_expires_s} s.",
                {
                    "200": {
                        "description": "The job.",
                        "headers": ok_headers,
                        "content": _json_content(_ref("Job")),
                    },
                    "404": _response("NotFound"),
                    "503": _response("ServiceUnavailable"),
                },
                tag="jobs",
                operation_id="getJob",
                parameters=[
                    {
                        "name": "job_id",
                        "in": "path",
                        "required": True,
                        "description": "Any other id is answered 404.",
                        "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
                    },
                    request_id,
                ],
            )
        },
        "/health": {
            "get": _operation(
                "Liveness",
                "200 while the process answers; checks no dependency.",
                {"200": {"description": "Alive.", "content": _json_content(_ref("Health"))}},
                tag="operations",
                operation_id="health",
            )
        },
        "/ready": {
            "get": _operation(
                "Readiness",
                "200 when Redis answers, the API resolves the model and at least one worker "
                "child has it loaded (lists workers and versions); 503 problem with the same "
                "details otherwise.",
                {
                    "200": {"description": "Ready.", "content": _json_content(_ref("Ready"))},
                    "503": {
                        "description": "Not ready.",
                        "content": {
                            "application/problem+json": {
                                "schema": {"allOf": [_ref("Problem"), _ref("Ready")]}
                            }
                        },
                    },
                },
                tag="operations",
                operation_id="ready",
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                "Per-route request counts and latencies, cache hits/misses/errors "
                "(heimdall_cache_*_total), sync waits that ran out "
                "(heimdall_dispatch_timeouts_total) and problems by type "
                "(heimdall_prediction_errors_total).",
                {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                tag="operations",
                operation_id="metrics",
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document",
                "The OpenAPI 3.1 description of the service.",
                {
                    "200": {
                        "description": "OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                tag="operations",
                operation_id="openapi",
            )
        },
        "/docs": {
            "get": _operation(
                "API reference page",
                "This document rendered as HTML.",
                {
                    "200": {
                        "description": "HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                tag="operations",
                operation_id="docs",
            )
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Heimdall Inference API",
            "version": "1.0.0",
            "summary": "Localize radio transmitters from what a network of receivers heard.",
            "description": (
                "Send each station's complex-baseband IQ recording; get the transmitter's "
                "latitude/longitude, a 2-D uncertainty (covariance, 68 % and 95 % ellipses, "
                "GeoJSON) and the model version that answered. Every error is an RFC 9457 "
                "problem document (application/problem+json)."
            ),
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "predict", "description": "Single localizations."},
            {"name": "batch", "description": "Many localizations in one request."},
            {"name": "jobs", "description": "Asynchronous results."},
            {"name": "operations", "description": "Probes, metrics, this document."},
        ],
        "paths": paths,
        "components": {
            "schemas": _schemas(settings, contract),
            "parameters": {
                "Timeout": {
                    "name": "timeout",
                    "in": "query",
                    "required": False,
                    "description": (
                        "Seconds to wait for the workers before answering 202; can only lower "
                        f"the server's {settings.predict_timeout_s:g} s."
                    ),
                    "schema": {"type": "number", "minimum": 0},
                },
                "RequestId": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": (
                        "Your id for this request (1-128 of A-Z a-z 0-9 . _ : -, starting "
                        "with a letter or digit), echoed back and logged by the API and the "
                        "workers. Any other value is not refused but replaced by a new id."
                    ),
                    "schema": {"type": "string"},
                },
            },
            "headers": {
                "X-Request-ID": {
                    "description": "The request id (yours, or a new uuid4 hex).",
                    "required": True,
                    "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
                }
            },
            "responses": {
                "BadRequest": _problem_response("Malformed JSON or wrong types."),
                "NotFound": _problem_response("No such job (or resource)."),
                "PayloadTooLarge": _problem_response(
                    f"Body over {settings.max_request_bytes} bytes ({settings.max_batch_bytes} "
                    f"for a batch, chunked bodies too), or more than "
                    f"{settings.max_batch_items} batch items."
                ),
                "UnsupportedMediaType": _problem_response("The body is not application/json."),
                "Unprocessable": _problem_response(
                    "Well-formed but unusable: bad IQ, unknown or duplicate station, sample "
                    "rate mismatch, frequency out of band, too few stations, empty batch."
                ),
                "InternalError": _problem_response("A worker failed unexpectedly (logged)."),
                "ServiceUnavailable": _problem_response(
                    "Redis (broker), the workers or the model are unavailable; retry later."
                ),
            },
        },
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI document."""
    return jsonify(build_spec(services().settings, served_contract()))


@bp.get("/docs")
def docs() -> str:
    """The OpenAPI document as a self-contained HTML page."""
    spec = build_spec(services().settings, served_contract())
    return render_template_string(
        DOCS_TEMPLATE,
        info=spec["info"],
        operations=_operations_view(spec),
        schemas={name: json.dumps(schema, indent=2) for name, schema in _components(spec).items()},
    )


def _components(spec: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    return schemas


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow one local ``$ref`` (``#/components/...``)."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    resolved: dict[str, Any] = target
    return resolved


def _schema_name(schema: dict[str, Any]) -> str:
    ref = schema.get("$ref", "")
    if ref:
        return str(ref.rsplit("/", 1)[-1])
    return json.dumps(schema)


def _operations_view(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Operations with parameters and responses resolved, for the template."""
    view = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            responses = []
            for status, response in op["responses"].items():
                response = _resolve(spec, response)
                contents = [
                    {"type": media_type, "schema": _schema_name(media.get("schema", {}))}
                    for media_type, media in response.get("content", {}).items()
                ]
                responses.append(
                    {"status": status, "description": response["description"], "content": contents}
                )
            view.append(
                {
                    "anchor": re.sub(r"[^a-z0-9]+", "-", f"{method}{path}".lower()).strip("-"),
                    "method": method.upper(),
                    "path": path,
                    "summary": op["summary"],
                    "description": op["description"],
                    "tag": op["tags"][0],
                    "parameters": [_resolve(spec, p) for p in op.get("parameters", [])],
                    "body": _schema_name(body["schema"]) if body else None,
                    "responses": responses,
                }
            )
    return view
