"""The running stack against its own OpenAPI document, with generated requests (schemathesis).

gunicorn (deploy/gunicorn.conf.py), the session's real prefork worker and the
private Redis answer requests that schemathesis derives from ``/openapi.json``:
valid ones (positive) and ones that break the document on purpose (negative).
Every response must be no 5xx and match the document: status code, content
type, headers (``X-Request-ID``) and body schema; a request that breaks the
document must be refused with a 4xx.

The number of cases is bounded (``CASES_PER_MODE`` per operation and mode) and
the generation derandomized, so CI runs the same few hundred requests in about
a minute; ``SCHEMATHESIS_CASES=500`` hunts further locally.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from strategies import json_values, valid_bodies
from test_gunicorn import Gunicorn, gunicorn  # noqa: F401  (the fixture, shared with that module)

CASES_PER_MODE = int(os.environ.get("SCHEMATHESIS_CASES", "20"))
ONLY = os.environ.get("SCHEMATHESIS_ONLY", "")
"""Run only the operations whose label contains this (a local hunt)."""
REQUEST_TIMEOUT_S = 60.0

CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            # JSON Schema cannot say everything the validation enforces (a station
            # at most once per request; with continue_on_error=false, the batch
            # items' schema), so a schema-valid request may still get a 422, which
            # the document lists. That valid requests are accepted is proven by
            # the positive cases of VALID_BODIES instead.
            "positive_data_acceptance": {"enabled": False},
            # Too many batch items is a documented 413 (Payload too large). The
            # admin operations refuse every request of a client without the token
            # (401, or 403 when the server has none) before looking at the body.
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
            },
        }
    }
)
_BATCH = st.fixed_dictionaries(
    {"items": st.lists(valid_bodies() | json_values(non_finite=False), min_size=1, max_size=3)},
    optional={"continue_on_error": st.just(True)},
)
VALID_BODIES: dict[str, st.SearchStrategy[Any]] = {
    "POST /api/v1/predict": valid_bodies(),
    "POST /api/v1/predict/async": valid_bodies(),
    "POST /api/v1/predict/batch": _BATCH,
    "POST /api/v1/predict/batch/async": _BATCH,
}
"""Positive bodies of the predict operations: real recordings (tests/strategies.py).

schemathesis's own positive bodies for them take ~5 s each to generate (512+
pairs, or 5 464+ base64 characters, per receiver), too slow for CI; its
negative bodies are cheap and run as for every operation. Query parameters
and headers are still generated from the document.
"""

pytestmark = pytest.mark.slow


def test_every_response_matches_the_document(gunicorn: Gunicorn) -> None:  # noqa: F811
    schema = schemathesis.openapi.from_url(gunicorn.url("/openapi.json"), config=CONFIG)
    statuses: Counter[tuple[str, str, int]] = Counter()
    failures: list[str] = []
    with requests.Session() as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if ONLY not in operation.label:
                continue
            bodies = VALID_BODIES.get(operation.label)
            positive = (
                operation.as_strategy(GenerationMode.POSITIVE)
                if bodies is None
                else bodies.flatmap(
                    lambda body, op=operation: op.as_strategy(GenerationMode.POSITIVE, body=body)
                )
            )
            runs = [
                ("positive", positive),
                ("negative", operation.as_strategy(GenerationMode.NEGATIVE)),
            ]
            for mode, strategy in runs:
                started = time.monotonic()
                try:
                    _exercise(operation.label, mode, strategy, gunicorn.base_url, http, statuses)
                except Unsatisfiable:
                    # Nothing to break: no body, no parameter that can be made invalid
                    # (a header is always a string). Only positive cases then.
                    if mode != "negative":
                        raise
                except (Exception, BaseExceptionGroup) as exc:
                    # One failing operation must not hide the others.
                    detail = "".join(traceback.format_exception(exc))[-4000:]
                    failures.append(f"{operation.label} [{mode}]:\n{detail}")
                print(f"{operation.label} [{mode}]: {time.monotonic() - started:.1f} s")

    total = sum(statuses.values())
    print(f"\nschemathesis: {total} requests, {len(failures)} operations failing")
    for (label, mode, status), count in sorted(statuses.items()):
        print(f"  {label} [{mode}] -> {status}: {count}")
    server_errors = {key: n for key, n in statuses.items() if key[2] >= 500}
    assert not failures, "\n\n".join(failures) + f"\n\ngunicorn log:\n{gunicorn.log()[-5000:]}"
    assert not server_errors, server_errors
    assert total >= CASES_PER_MODE


def _exercise(
    label: str,
    mode: str,
    strategy: Any,
    base_url: str,
    http: requests.Session,
    statuses: Counter[tuple[str, str, int]],
) -> None:
    @settings(
        max_examples=CASES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        # No shrinking: a failure is reported as found (with a curl line), and
        # the run stays within its time however many operations fail.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=http, timeout=REQUEST_TIMEOUT_S)
        statuses[(label, mode, response.status_code)] += 1
        case.validate_response(response)

    run()
