"""Job messages -> decoded requests -> per-item answers, and batch assembly.

This is the worker's side of the message contract (docs: serving contract):
a job is ``{"payload_key": str|None, "payload_b64": str|None, "request_id": str,
"version": str, "alias": str}`` (``version``/``alias``: the version the API's
traffic policy chose, absent for the champion);
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from heimdall import batch
from heimdall.contract import (
    MSG_ALIAS,
    MSG_VERSION,
    PAYLOAD_PREFIX,
    RESULT_FALLBACK,
    RESULT_FALLBACK_REASON,
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
    ModelUnavailable,
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


NOT_LOADED, RUN_ERROR, CARD_MISMATCH = "not_loaded", "error", "card_mismatch"
"""Why the champion answered instead of the chosen version (a bounded metric label)."""

FallbackListener = Callable[[str], None]
"""Told the reason label of each fallback (for the worker's metrics)."""


@dataclass(frozen=True)
class Served:
    """The versions one process holds, and how a job picks among them.

    ``champion`` is the Localizer that answers when the chosen version cannot
    (or the error to answer with when this process has no champion);
    ``versions`` maps a registry version to its Localizer (the champion's
    included), ``aliases`` a served target (alias, or explicit version as
    named in ``extra_models``) to its Localizer, and ``failed`` a target that
    did not load to why.
    """

    champion: Localizer | HeimdallError
    versions: Mapping[str, Localizer] = field(default_factory=dict)
    aliases: Mapping[str, Localizer] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)

    def chosen(self, job: Any) -> tuple[Localizer | None, str | None]:
        """The Localizer a job asks for (None: the champion) and, when it is not held, why.

        By the job's ``version`` first, then by its ``alias``; a job naming
        neither is the champion's.
        """
        if not isinstance(job, Mapping):
            return None, None
        version, alias = _text(job.get(MSG_VERSION)), _text(job.get(MSG_ALIAS))
        if version is None and alias is None:
            return None, None
        if version is not None and version in self.versions:
            return self.versions[version], None
        if alias is not None and alias in self.aliases:
            return self.aliases[alias], None
        if version is None:
            named = f"target {alias}"
        else:
            named = f"version {version}" + (f" ({alias})" if alias else "")
        why = self.failed.get(alias) if alias is not None else None
        if why:
            return None, f"{named} failed to load on this worker: {why}"
        return None, f"{named} is not loaded on this worker"

    def exact(self, job: Any) -> Localizer | HeimdallError:
        """The Localizer of the job's ``version`` exactly, or the error to record (no fallback)."""
        version = _text(job.get(MSG_VERSION)) if isinstance(job, Mapping) else None
        if version is not None and version in self.versions:
            return self.versions[version]
        return ModelUnavailable(f"version {version} is not loaded on this worker")


def _text(value: Any) -> str | None:
    """A version or alias as sent (a number is read as its text), None when absent."""
    return None if value is None else str(value)


def fallback_fields(reason: str | None) -> dict[str, Any]:
    """The fields every computed result carries about fallback."""
    return {RESULT_FALLBACK: reason is not None, RESULT_FALLBACK_REASON: reason}


def predict_jobs(
    jobs: Sequence[Any],
    served: Served | Localizer | HeimdallError,
    fetch: PayloadFetcher,
    *,
    min_stations: int,
    on_fallback: FallbackListener | None = None,
    interrupts: tuple[type[BaseException], ...] = (),
) -> list[Item]:
    """One answer per job, in order; the jobs of one version share one ONNX run.

    Each job is answered by the version it names (:meth:`Served.chosen`);
    when that version is not held, does not fit the request, or raises while
    predicting, the champion answers and the result says so (``fallback``,
    ``fallback_reason``; ``on_fallback`` is told the reason label). A bare
    Localizer (or error) is a process serving only its champion. Unexpected
    faults of the champion's run propagate (the task fails loudly), and so do
    ``interrupts`` (e.g. a time limit) raised by any run. A request that no
    held version can answer gets the chosen version's problem, not a fallback.
    """
    if not isinstance(served, Served):
        served = Served(champion=served)
    champion = served.champion
    answers: list[Item | None] = [None] * len(jobs)
    chosen: dict[int, tuple[Localizer, list[tuple[int, DecodedRequest]]]] = {}
    by_champion: list[tuple[int, DecodedRequest, str | None]] = []

    def to_champion(i: int, request: DecodedRequest, reason: str | None) -> None:
        try:
            if isinstance(champion, HeimdallError):
                raise champion
            check_compatible(request, champion.card, min_stations)
        except HeimdallError as exc:
            answers[i] = error_item(exc)
            return
        by_champion.append((i, request, reason))

    def fall_back(label: str, reason: str, i: int, request: DecodedRequest) -> None:
        if on_fallback is not None:
            on_fallback(label)
        to_champion(i, request, reason)

    for i, job in enumerate(jobs):
        try:
            request = load_request(job, fetch)
        except HeimdallError as exc:
            answers[i] = error_item(exc)
            continue
        localizer, missing = served.chosen(job)
        if missing is not None:
            fall_back(NOT_LOADED, missing, i, request)
        elif localizer is None or localizer is champion:
            to_champion(i, request, None)
        else:
            try:
                check_compatible(request, localizer.card, min_stations)
            except HeimdallError as exc:
                if not _fits(champion, request, min_stations):
                    answers[i] = error_item(exc)
                    continue
                reason = f"{_named(localizer)} cannot answer it: {exc.detail}"
                fall_back(CARD_MISMATCH, reason, i, request)
                continue
            chosen.setdefault(id(localizer), (localizer, []))[1].append((i, request))

    # The chosen versions first: the jobs of a run that raises go to the champion.
    for localizer, members in chosen.values():
        try:
            results = localizer.predict_results([r for _, r in members])
        except interrupts:
            raise
        except Exception as exc:
            reason = f"{_named(localizer)} failed while predicting ({type(exc).__name__})"
            for i, request in members:
                fall_back(RUN_ERROR, reason, i, request)
            continue
        for (i, _), result in zip(members, results, strict=True):
            answers[i] = ok_item({**result, **fallback_fields(None)})
    if by_champion and not isinstance(champion, HeimdallError):
        results = champion.predict_results([r for _, r, _ in by_champion])
        for (i, _, why), result in zip(by_champion, results, strict=True):
            answers[i] = ok_item({**result, **fallback_fields(why)})
    return [a if a is not None else error_item(_lost()) for a in answers]


def _fits(champion: Localizer | HeimdallError, request: DecodedRequest, min_stations: int) -> bool:
    if isinstance(champion, HeimdallError):
        return False
    try:
        check_compatible(request, champion.card, min_stations)
    except HeimdallError:
        return False
    return True


def _named(localizer: Localizer) -> str:
    identity = localizer.identity
    return f"version {identity.version}" + (f" ({identity.alias})" if identity.alias else "")


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
