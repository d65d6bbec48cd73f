"""Reading a request body in one piece.

werkzeug reads ``wsgi.input`` through its ``LimitedStream``, and gunicorn's
``Body.read`` fills any read 1 KB at a time, copying the rest of each 8 KB
socket chunk back into a buffer on every step: a 260 KB prediction body took
about a third of the API's CPU on a cache hit. When the body has a
Content-Length and nothing of it is buffered yet, :func:`read_body` asks
gunicorn's length reader for all of it at once (the same bytes, one pass).
Any other server, a chunked body, or a stream already read from takes
werkzeug's path.
"""

from __future__ import annotations

from typing import Any

from flask import Request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge


def read_body(request: Request) -> bytes:
    """The whole body of ``request``; 413 past ``max_content_length``, 400 when cut short."""
    length = request.content_length
    limit = request.max_content_length
    if length is not None and limit is not None and length > limit:
        raise RequestEntityTooLarge()
    reader = _length_reader(request.environ.get("wsgi.input"))
    if length is None or reader is None:
        return request.get_data(cache=False)
    raw: bytes = reader.read(length) if length else b""
    if len(raw) < length:
        # What werkzeug's stream says when a client sends less than it announced.
        raise ClientDisconnected()
    return raw


def _length_reader(stream: Any) -> Any | None:
    """gunicorn's reader behind ``stream`` when the body can be read from it directly."""
    reader = getattr(stream, "reader", None)
    buffered = getattr(stream, "buf", None)
    if type(reader).__name__ != "LengthReader" or buffered is None:
        return None
    if type(reader).__module__ != "gunicorn.http.body" or buffered.tell() != 0:
        return None
    return reader
