"""The API's JSON provider keeps Flask's conventions with orjson underneath."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal

from flask import Flask, jsonify

from app.jsonprovider import OrjsonProvider


def _app(debug: bool = False) -> Flask:
    app = Flask(__name__)
    app.debug = debug
    app.json = OrjsonProvider(app)
    return app


def test_documents_read_back_the_same_with_sorted_keys() -> None:
    app = _app()
    document = {"b": [1, 2.5, None, True], "a": {"z": "é", "y": -0.0}, "c": 1e-7}
    with app.app_context():
        text = jsonify(document).get_data(as_text=True)

    assert json.loads(text) == document
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert text.index('"y"') < text.index('"z"')


def test_flask_conventions_for_dates_decimals_and_indent() -> None:
    when = datetime(2026, 11, 23, 20, 0, 0, tzinfo=UTC)
    with _app().app_context():
        compact = jsonify({"at": when, "amount": Decimal("1.50")}).get_data(as_text=True)
    with _app(debug=True).app_context():
        indented = jsonify({"a": 1}).get_data(as_text=True)

    assert json.loads(compact) == {"at": "Mon, 23 Nov 2026 20:00:00 GMT", "amount": "1.50"}
    assert "\n" not in compact.strip()
    assert indented.startswith('{\n  "a": 1')


def test_non_finite_numbers_become_null_not_invalid_json() -> None:
    with _app().app_context():
        text = jsonify({"x": math.nan, "y": math.inf}).get_data(as_text=True)

    assert json.loads(text) == {"x": None, "y": None}


def test_integers_beyond_64_bits_still_serialize() -> None:
    with _app().app_context():
        text = jsonify({"n": 2**70}).get_data(as_text=True)

    assert json.loads(text) == {"n": 2**70}
