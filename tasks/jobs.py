"""Job messages -> decoded requests -> per-item answers, and batch assembly.

This is the worker's side of the message contract (docs: serving contract):
a job is ``{"payload_key": str|None, "payload_b64": str|None, "request_id": str}``;
its payload is the canonical :class:`~heimdall.iq.DecodedRequest` blob, either
claim-checked in Redis under ``heimdall:payload:{sha256}`` or inline as base64.
An item answer is ``{"status": "ok", "result": {...}}`` or
``{"status": "error", "problem": {...}}``. Nothing here knows Celery, so the
functions are plain to test; the tasks in :mod:`tasks.predict` are wrappers.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from heimdall import batch
from heimdall.contract import (
    PAYLOAD_PREFIX,
    BatchDocument,
    BatchMeta,
    ErrorItem,
    OkItem,
    PredictionItem,
)
from heimdall.errors import (
    FrequencyOutOfBand,
    HeimdallError,
    InvalidInput,
    InvalidRequest,
    ServiceUnavailable,
    TooFewStations,
    UnknownStation,
)
from heimdall.iq import DecodedRequest
from heimdall.modelcard import ModelCard

if TYPE_CHECKING:  # onnxruntime is imported only where a session is built
    from heimdall.runtime import Localizer

PAYLOAD_KEY_PREFIX = PAYLOAD_PREFIX

Item = PredictionItem
PayloadFetcher = Callable[[str], bytes | None]
"""Returns the blob stored under a Redis key, None when the key is absent."""


class PayloadExpired(HeimdallError):
    """The claim-checked payload is no longer in Redis (TTL passed, or evicted)."""

    status = 410
    type = "payload-expired"
    title = "Payload expired"


class CrashedWorker(HeimdallError):
    """The request made the worker process running it die, more than once."""

    status = 422
    type = "request-crashed-worker"
    title = "Request crashed the worker"


def payload_keys(job_list: Sequence[Any]) -> list[str]:
    """The claim-check keys the jobs of one task refer to (to delete once it is done)."""
    return [
        key
        for job in job_list
        if isinstance(job, Mapping)
        and isinstance(key := job.get("payload_key"), str)
        and key.startswith(PAYLOAD_KEY_PREFIX)
    ]


def ok_item(result: dict[str, Any]) -> OkItem:
    """Answer of an item that was localized."""
    return {"status": "ok", "result": result}


def error_item(exc: HeimdallError) -> ErrorItem:
    """Answer of an item that failed with a domain error."""
    return {"status": "error", "problem": exc.to_problem()}


def load_request(job: Any, fetch: PayloadFetcher) -> DecodedRequest:
    """Decode the request a job carries (claim-check key first, inline base64 second).

    Raises :class:`InvalidRequest` for a malformed job, :class:`PayloadExpired`
    when the key is gone, :class:`InvalidInput` when the blob is not a request.
    """
    if not isinstance(job, Mapping):
        raise InvalidRequest(f"a job must be an object, got {type(job).__name__}")
    key, inline = job.get("payload_key"), job.get("payload_b64")
    if key is not None:
        if not isinstance(key, str) or not key.startswith(PAYLOAD_KEY_PREFIX):
            # Never read arbitrary Redis keys on a message's say-so.
            raise InvalidRequest(
                f"payload_key must start with {PAYLOAD_KEY_PREFIX!r}", field="payload_key"
            )
        blob = fetch(key)
        if blob is None:
            if not isinstance(inline, str):
                raise PayloadExpired(
                    f"the request payload {key} is no longer stored; send the request again",
                    field="payload_key",
                )
        else:
            return _from_blob(blob)
    if not isinstance(inline, str):
        raise InvalidRequest("a job needs payload_key or payload_b64", field="payload_b64")
    try:
        blob = base64.b64decode(inline, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("payload_b64 is not valid base64", field="payload_b64") from exc
    return _from_blob(blob)


def _from_blob(blob: bytes) -> DecodedRequest:
    try:
        return DecodedRequest.from_bytes(blob)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise InvalidInput(f"the job payload is not a Heimdall request blob ({exc})") from exc


def check_compatible(request: DecodedRequest, card: ModelCard, min_stations: int) -> None:
    """Refuse a request the served model cannot answer.

    The API validated the request against the model *it* resolved; the worker
    may serve another version (a reload in between), so it checks again.
    """
    unknown = [sid for sid in request.stations if sid not in card.slots]
    if unknown:
        raise UnknownStation(
            f"station {unknown[0]!r} is not in the served model's network "
            f"(known: {', '.join(card.slots)})",
            station=unknown[0],
        )
    low, high = card.band_mhz
    if not low <= request.frequency_mhz <= high:
        raise FrequencyOutOfBand(
            f"frequency_mhz {request.frequency_mhz:g} is outside the model's band "
            f"{low:g}-{high:g} MHz"
        )
    if len(request.stations) < min_stations:
        raise TooFewStations(
            f"{len(request.stations)} station(s) given, at least {min_stations} needed"
        )


def predict_jobs(
    jobs: Sequence[Any],
    localizer: Localizer | HeimdallError,
    fetch: PayloadFetcher,
    *,
    min_stations: int,
) -> list[Item]:
    """One answer per job, in order; all decodable jobs share one ONNX run.

    ``localizer`` is the error to answer with when this process has no model.
    Unexpected faults of the model run propagate (the task fails loudly).
    """
    answers: list[Item | None] = [None] * len(jobs)
    requests: list[DecodedRequest] = []
    positions: list[int] = []
    for i, job in enumerate(jobs):
        try:
            request = load_request(job, fetch)
            if isinstance(localizer, HeimdallError):
                raise localizer
            check_compatible(request, localizer.card, min_stations)
        except HeimdallError as exc:
            answers[i] = error_item(exc)
            continue
        requests.append(request)
        positions.append(i)
    if requests and not isinstance(localizer, HeimdallError):
        results = localizer.predict_results(requests)
        for i, result in zip(positions, results, strict=True):
            answers[i] = ok_item(result)
    return [a if a is not None else error_item(_lost()) for a in answers]


def _lost() -> HeimdallError:
    return ServiceUnavailable("the worker produced no answer for this item")


def memo_fetcher(fetch: PayloadFetcher) -> PayloadFetcher:
    """``fetch`` that reads each key once (a batch may repeat the same payload)."""
    seen: dict[str, bytes | None] = {}

    def cached(key: str) -> bytes | None:
        if key not in seen:
            seen[key] = fetch(key)
        return seen[key]

    return cached


def assemble_batch(
    chunk_results: Sequence[Sequence[Item] | None], meta: BatchMeta
) -> BatchDocument:
    """Put every item of a batch back in request order: :func:`heimdall.batch.assemble`."""
    return batch.assemble(chunk_results, meta)


def summarize(retval: Any) -> str:
    """A short outcome of a task's return value, for log lines."""
    if isinstance(retval, dict) and "status" in retval:
        problem = retval.get("problem") or {}
        return str(retval["status"]) + (f":{problem.get('status')}" if problem else "")
    if isinstance(retval, list):
        n_ok = sum(1 for r in retval if isinstance(r, dict) and r.get("status") == "ok")
        return f"ok={n_ok} error={len(retval) - n_ok}"
    if isinstance(retval, dict) and isinstance(counts := retval.get("counts"), dict):
        return f"succeeded={counts.get('succeeded')} failed={counts.get('failed')}"
    return type(retval).__name__
