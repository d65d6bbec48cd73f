"""The API's OpenAPI 3.1 description (``/openapi.json``) and a readable page of it (``/docs``).

The document is generated: the operations are the ``OPERATIONS`` lists of the
modules in :data:`MODULES` (see :class:`app.schemas.Operation`), their bodies
the JSON Schema of the pydantic models those operations name, collected into
``components/schemas``. What is known only when serving (the served model's
stations and band, the settings' limits and timeouts) is filled in per request.
A test checks that every ``/api/v1`` route in the app's URL map appears in it;
schemathesis checks the running service against it. ``/docs`` is rendered on
the server from the same document, with no script or stylesheet from
elsewhere: the service may run where there is no internet.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Response, jsonify, render_template_string
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from app.docs_template import DOCS_TEMPLATE
from app.schemas import (
    PATH_PARAMETERS,
    REQUEST_ID_PATTERN,
    Operation,
    Problem,
    apply_served_limits,
)
from app.services import services
from heimdall.config import Settings
from heimdall.errors import HeimdallError
from heimdall.stations import load_network

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"

MODULES: list[str] = [
    "app.schemas",
    "app.model_api_docs",
]
"""Modules whose ``OPERATIONS`` the document describes, in this order."""

TAGS: dict[str, str] = {
    "predict": "Single localizations.",
    "batch": "Many localizations in one request.",
    "jobs": "Asynchronous results.",
    "model": "The served model versions: traffic, promotion, reloads, live performance.",
    "operations": "Probes, metrics, this document.",
}

PROBLEM_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed JSON or wrong types.",
    401: "Missing or wrong admin bearer token.",
    403: "No admin token is configured on the server (set HEIMDALL_ADMIN_TOKEN).",
    404: "No such job (or resource).",
    409: "Conflicts with the resource's current state.",
    413: (
        "Body over {settings.max_request_bytes} bytes ({settings.max_batch_bytes} for a "
        "batch, chunked bodies too), or more than {settings.max_batch_items} batch items."
    ),
    415: "The body is not application/json.",
    422: (
        "Well-formed but unusable: bad IQ, unknown or duplicate station, sample rate out "
        "of range, frequency out of band, too few stations, empty batch."
    ),
    500: "A worker failed unexpectedly (logged).",
    502: "The workers answered, but not all of them did what was asked.",
    503: "Redis (broker), the workers or the model are unavailable; retry later.",
}
"""Description of a plain :class:`Problem` response, by status; ``{settings.NAME}`` filled in."""

_REF = "#/components/schemas/{model}"
_REQUEST_ID_HEADER = {"$ref": "#/components/headers/X-Request-ID"}
_SECURITY_SCHEME = "adminToken"


class _JsonSchema(GenerateJsonSchema):
    """pydantic's JSON Schema without a title on every property (the name says it)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


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


def operations() -> list[Operation]:
    """Every declared operation, module by module in :data:`MODULES` order."""
    found: list[Operation] = []
    for name in MODULES:
        found.extend(importlib.import_module(name).OPERATIONS)
    return found


def component_schemas(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """JSON Schema of ``models`` and of every model they use, by model name.

    Raises ``ValueError`` when two different models share a name: each
    component is referred to by its name alone.
    """
    return copy.deepcopy(_component_schemas(models))


@functools.cache
def _component_schemas(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF, schema_generator=_JsonSchema)
        nested = schema.pop("$defs", {})
        for name, body in [(model.__name__, schema), *nested.items()]:
            if components.setdefault(name, body) != body:
                raise ValueError(f"two different documents are named {name!r}")
    return components


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _first_paragraph(model: type[BaseModel]) -> str | None:
    doc = model.__dict__.get("__doc__")
    if not doc:
        return None
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _response(status: int, model: type[BaseModel], settings: Settings) -> dict[str, Any]:
    if model is Problem:
        text = PROBLEM_DESCRIPTIONS.get(status, HTTPStatus(status).phrase)
        description = text.format(settings=settings)
    else:
        description = _first_paragraph(model) or HTTPStatus(status).phrase
    headers: dict[str, Any] = {"X-Request-ID": _REQUEST_ID_HEADER}
    for name, text in getattr(model, "response_headers", {}).items():
        headers[name] = {"description": text, "required": True, "schema": {"type": "string"}}
    if status == 401:
        headers["WWW-Authenticate"] = {
            "description": "Bearer: how to authenticate.",
            "required": True,
            "schema": {"type": "string"},
        }
    media_type = getattr(model, "media_type", "application/json")
    return {
        "description": description,
        "headers": headers,
        "content": {media_type: {"schema": _ref(model.__name__)}},
    }


def _parameters(op: Operation, settings: Settings) -> list[dict[str, Any]]:
    parameters = []
    for name in re.findall(r"{([^}]+)}", op.path):
        known = PATH_PARAMETERS.get(name, {"schema": {"type": "string"}})
        parameters.append({"name": name, "in": "path", "required": True, **known})
    for name, json_type, description, *more in op.query:
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description.format(settings=settings),
                "schema": {"type": json_type, **(dict(more[0]) if more else {})},
            }
        )
    parameters.append({"$ref": "#/components/parameters/RequestId"})
    return parameters


def _operation(op: Operation, settings: Settings) -> dict[str, Any]:
    responses = dict(op.responses)
    if op.admin:
        responses.setdefault(401, Problem)
        responses.setdefault(403, Problem)
    entry: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "description": op.description.format(settings=settings),
        "operationId": op.operation_id or re.sub(r"\W+", "_", f"{op.method}{op.path}").strip("_"),
        "parameters": _parameters(op, settings),
        "responses": {
            str(status): _response(status, model, settings)
            for status, model in sorted(responses.items())
        },
    }
    if op.request is not None:
        entry["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.request.__name__)}},
        }
    if op.admin:
        entry["security"] = [{_SECURITY_SCHEME: []}]
    return entry


def _models(ops: list[Operation]) -> tuple[type[BaseModel], ...]:
    """Every model the operations name, first use first, each once."""
    seen: dict[type[BaseModel], None] = {}
    for op in ops:
        if op.request is not None:
            seen.setdefault(op.request)
        for model in op.responses.values():
            seen.setdefault(model)
        if op.admin:
            seen.setdefault(Problem)
    return tuple(seen)


def build_spec(settings: Settings, contract: Contract) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this service under ``settings`` (limits, timeouts).

    ``contract`` fills in what the served model accepts: its stations and band.
    """
    ops = operations()
    schemas = component_schemas(_models(ops))
    apply_served_limits(
        schemas,
        stations=contract.stations,
        band_mhz=contract.band_mhz,
        min_stations=settings.min_stations,
        max_batch_items=settings.max_batch_items,
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        methods = paths.setdefault(op.path, {})
        if op.method in methods:
            raise ValueError(f"{op.method.upper()} {op.path} is declared twice")
        methods[op.method] = _operation(op, settings)
    used = {op.tag: None for op in ops}
    tags = [tag for tag in TAGS if tag in used] + [tag for tag in used if tag not in TAGS]
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
        "tags": [{"name": tag, "description": TAGS.get(tag, tag)} for tag in tags],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "parameters": {
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
            "securitySchemes": {
                _SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token the server is configured with "
                    "(HEIMDALL_ADMIN_TOKEN); needed by the operations that change state.",
                }
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
        schemas={
            name: {
                "description": schema.get("description", ""),
                "text": json.dumps(schema, indent=2),
            }
            for name, schema in _components(spec).items()
        },
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
                    "admin": bool(op.get("security")),
                    "parameters": [_resolve(spec, p) for p in op.get("parameters", [])],
                    "body": _schema_name(body["schema"]) if body else None,
                    "responses": responses,
                }
            )
    return view
