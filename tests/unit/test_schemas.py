"""The declared HTTP documents and the OpenAPI document generated from them.

The request models only describe: :mod:`heimdall.iq` validates. So the tests
here hold the two to the same limits, on the same bodies, at each boundary.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonschema_rs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from pydantic import BaseModel, ValidationError
from strategies import BAND, MIN_STATIONS, STATIONS, valid_bodies

from app import openapi, schemas
from app.openapi import Contract, build_spec, component_schemas
from app.schemas import MAX_ROUTING_KEY_CHARS, Operation, PredictRequest, Problem
from heimdall.config import Settings
from heimdall.errors import HeimdallError
from heimdall.iq import (
    MAX_ABS_SAMPLE,
    MAX_SAMPLE_RATE_HZ,
    MAX_SAMPLES,
    MIN_DURATION_S,
    MIN_SAMPLE_RATE_HZ,
    MIN_SAMPLES,
    decode_request,
    encode_base64,
)

RATE_HZ = 48_000.0
"""A rate at which MIN_SAMPLES is long enough (the duration rule is not in the schema)."""


def _schema_validator() -> Any:
    """The published request schema's validator (the engine schemathesis uses)."""
    return jsonschema_rs.validator_for(PredictRequest.model_json_schema())


def _iq_accepts(body: dict[str, Any]) -> bool:
    try:
        decode_request(body, stations=STATIONS, band_mhz=BAND, min_stations=MIN_STATIONS)
    except HeimdallError:
        return False
    return True


def _model_accepts(body: dict[str, Any]) -> bool:
    try:
        PredictRequest.model_validate(body)
    except ValidationError:
        return False
    return True


def _body(iq: Any, rate: float = RATE_HZ, **more: Any) -> dict[str, Any]:
    """A request whose first receiver sends ``iq``; the rest is valid."""
    others = encode_base64(_tone(max(MIN_SAMPLES, int(rate * MIN_DURATION_S) + 1)))
    receivers = [{"station": sid, "iq": others} for sid in STATIONS[:MIN_STATIONS]]
    receivers[0]["iq"] = iq
    return {"receivers": receivers, "sample_rate_hz": rate, **more}


def _tone(n: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.exp(2j * np.pi * 0.01 * np.arange(n))).astype(np.complex64)


def _pairs(n: int, value: float = 0.5) -> list[list[float]]:
    return [[value, -value]] * n


BOUNDARY_BODIES = {
    "pairs, one too few": _body(_pairs(MIN_SAMPLES - 1)),
    "pairs, fewest": _body(_pairs(MIN_SAMPLES)),
    "pairs, most": _body(_pairs(MAX_SAMPLES)),
    "pairs, one too many": _body(_pairs(MAX_SAMPLES + 1)),
    "pairs, largest sample": _body(_pairs(MIN_SAMPLES, MAX_ABS_SAMPLE)),
    "pairs, sample too large": _body(_pairs(MIN_SAMPLES, MAX_ABS_SAMPLE + 1)),
    "pairs, not a pair": _body([[0.5, 0.5, 0.5]] * MIN_SAMPLES),
    "pairs, a boolean": _body([[True, 0.5]] * MIN_SAMPLES),
    "base64, one too few": _body(encode_base64(_tone(MIN_SAMPLES - 1))),
    "base64, fewest": _body(encode_base64(_tone(MIN_SAMPLES))),
    "base64, most": _body(encode_base64(_tone(MAX_SAMPLES))),
    "base64, one too many": _body(encode_base64(_tone(MAX_SAMPLES + 1))),
    "base64, half a sample more": _body(encode_base64(_tone(MIN_SAMPLES + 1))[:-12] + "AAAA"),
    "base64, not base64": _body("#" * 5464),
    "rate, lowest": _body(encode_base64(_tone(MIN_SAMPLES)), MIN_SAMPLE_RATE_HZ),
    "rate, too low": _body(encode_base64(_tone(MIN_SAMPLES)), MIN_SAMPLE_RATE_HZ - 1),
    "rate, highest": _body(encode_base64(_tone(MAX_SAMPLES)), MAX_SAMPLE_RATE_HZ),
    "rate, too high": _body(encode_base64(_tone(MAX_SAMPLES)), MAX_SAMPLE_RATE_HZ + 1),
    "rate, missing": {"receivers": _body(_pairs(MIN_SAMPLES))["receivers"]},
    "unknown members": _body(_pairs(MIN_SAMPLES), truth={"latitude": 45.0}),
}


def test_schema_limits_are_the_iq_constants() -> None:
    schema = PredictRequest.model_json_schema()
    iq = schema["$defs"]["Receiver"]["properties"]["iq"]["anyOf"]
    pairs, text = (iq[0], iq[1]) if iq[0]["type"] == "array" else (iq[1], iq[0])
    rate = schema["properties"]["sample_rate_hz"]

    assert (pairs["minItems"], pairs["maxItems"]) == (MIN_SAMPLES, MAX_SAMPLES)
    for sample in pairs["items"]["prefixItems"]:
        assert (sample["minimum"], sample["maximum"]) == (-MAX_ABS_SAMPLE, MAX_ABS_SAMPLE)
    assert text["minLength"] == len(encode_base64(_tone(MIN_SAMPLES)))
    assert text["maxLength"] == len(encode_base64(_tone(MAX_SAMPLES)))
    assert (rate["minimum"], rate["maximum"]) == (MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ)
    assert schema["properties"]["routing_key"]["maxLength"] == MAX_ROUTING_KEY_CHARS


@pytest.mark.parametrize("case", list(BOUNDARY_BODIES))
def test_schema_model_and_iq_agree_at_the_limits(case: str) -> None:
    body = BOUNDARY_BODIES[case]

    accepted = _iq_accepts(body)

    assert _schema_validator().is_valid(body) == accepted, case
    assert _model_accepts(body) == accepted, case


def test_base64_pattern_takes_whole_samples_only() -> None:
    validator = _schema_validator()
    for extra_bytes in range(16):
        raw = _tone(MIN_SAMPLES).tobytes() + b"\x00" * extra_bytes
        body = _body(base64.b64encode(raw).decode())

        assert validator.is_valid(body) == _iq_accepts(body) == (extra_bytes % 8 == 0)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=valid_bodies())
def test_every_valid_request_fits_the_schema(body: dict[str, Any]) -> None:
    assert _iq_accepts(body)
    assert _schema_validator().is_valid(body)
    PredictRequest.model_validate(body)


# -- the generated document -----------------------------------------------------------------


class TrafficPolicy(BaseModel):
    """The traffic split."""

    weights: dict[str, int]


OPERATIONS = [
    Operation(
        "put",
        "/api/v1/example/traffic",
        "Set the traffic split",
        "model",
        {200: TrafficPolicy, 422: Problem},
        request=TrafficPolicy,
        admin=True,
    ),
    Operation(
        "post",
        "/api/v1/example/jobs/{job_id}/truth",
        "Ground truth of a job",
        "jobs",
        {200: TrafficPolicy, 404: Problem, 409: Problem},
        admin=True,
    ),
]
"""Example operations (paths no app serves): a test adds this module to ``openapi.MODULES``."""


def _spec() -> dict[str, Any]:
    return build_spec(Settings(), Contract(STATIONS, 16_000.0, BAND))


def _resolve(spec: dict[str, Any], ref: str) -> Any:
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_document_is_valid_openapi_with_every_reference_resolved() -> None:
    spec = _spec()

    assert spec["openapi"] == "3.1.0"
    for ref in _refs(spec):
        _resolve(spec, ref)
    validate(spec)


def test_every_declared_operation_and_model_is_in_the_document() -> None:
    spec = _spec()

    for op in schemas.OPERATIONS:
        entry = spec["paths"][op.path][op.method]
        assert {str(status) for status in op.responses} == set(entry["responses"])
        for model in op.responses.values():
            assert model.__name__ in spec["components"]["schemas"]
    assert "$defs" not in json.dumps(spec)


def test_served_limits_come_from_the_contract_and_settings() -> None:
    config = Settings().model_copy(update={"max_batch_items": 17, "min_stations": 4})
    spec = build_spec(config, Contract(("a", "b", "c", "d", "e"), 16_000.0, (430.0, 440.0)))
    schemas = spec["components"]["schemas"]
    receivers = schemas["PredictRequest"]["properties"]["receivers"]
    frequency = schemas["PredictRequest"]["properties"]["frequency_mhz"]

    assert schemas["Receiver"]["properties"]["station"]["enum"] == ["a", "b", "c", "d", "e"]
    assert (receivers["minItems"], receivers["maxItems"]) == (4, 5)
    assert (frequency["minimum"], frequency["maximum"]) == (430.0, 440.0)
    assert schemas["BatchRequest"]["properties"]["items"]["maxItems"] == 17
    assert "At most 17 items" in spec["paths"]["/api/v1/predict/batch"]["post"]["description"]


def test_adding_a_module_adds_its_operations_with_admin_security(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openapi, "MODULES", [*openapi.MODULES, __name__])

    spec = _spec()

    traffic = spec["paths"]["/api/v1/example/traffic"]["put"]
    assert traffic["security"] == [{"adminToken": []}]
    assert {"200", "401", "403", "422"} == set(traffic["responses"])
    assert "WWW-Authenticate" in traffic["responses"]["401"]["headers"]
    assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    assert "TrafficPolicy" in spec["components"]["schemas"]
    truth = spec["paths"]["/api/v1/example/jobs/{job_id}/truth"]["post"]
    job_id = next(p for p in truth["parameters"] if p.get("name") == "job_id")
    assert job_id["in"] == "path" and job_id["schema"]["pattern"]
    assert "model" in [tag["name"] for tag in spec["tags"]]
    validate(spec)


def test_two_documents_with_one_name_are_refused() -> None:
    other = type("Problem", (BaseModel,), {"__annotations__": {"code": int}})

    with pytest.raises(ValueError, match="Problem"):
        component_schemas((Problem, other))
