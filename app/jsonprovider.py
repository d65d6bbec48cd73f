"""Flask's JSON through orjson: the same documents, written several times faster.

A cache hit spends most of its time outside the model: with the standard
library encoder, writing the ~3 KB result document was about a tenth of the
API's CPU per hit. The provider keeps Flask's conventions: keys sorted,
dates as HTTP dates, decimals and anything with ``__html__`` through Flask's
own ``default``, two-space indent when Flask asks for it (debug). NaN and
infinities, which the standard library writes as invalid JSON, become
``null``; the rare value orjson cannot write (an integer beyond 64 bits) goes
through Flask's standard encoder.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


class OrjsonProvider(DefaultJSONProvider):
    """:class:`flask.json.provider.DefaultJSONProvider` with orjson's encoder and decoder."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """``obj`` as JSON text; ``indent`` gives two-space indentation, other options are moot."""
        options = _OPTIONS | (orjson.OPT_INDENT_2 if kwargs.get("indent") else 0)
        try:
            return orjson.dumps(obj, default=self.default, option=options).decode()
        except orjson.JSONEncodeError:
            # What orjson does not write (integers beyond 64 bits): the standard library does.
            return super().dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """The JSON value in ``s``."""
        return orjson.loads(s)
