"""The batch document: one builder for the worker that assembles it and the API that serves it.

``heimdall.collect_batch`` puts every item back in request order
(:func:`assemble`) and returns a :class:`~heimdall.contract.BatchDocument`; the
API serves that document with its own ``job_id``, ``request_id`` and
``elapsed_ms`` (:func:`batch_document` again, on the items it received). Both
go through :func:`batch_document`, so the document has one shape wherever it
is read: the sync answer, a polled job, the job record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import zip_longest
from typing import Any

from heimdall.contract import BatchDocument, BatchItem, BatchMeta, ErrorItem, PredictionItem
from heimdall.errors import ServiceUnavailable


def lost_item() -> ErrorItem:
    """The answer of an item no worker answered (a chunk came back short or not at all)."""
    problem = ServiceUnavailable("the worker produced no answer for this item").to_problem()
    return {"status": "error", "problem": problem}


def batch_item(index: int, item: Mapping[str, Any]) -> BatchItem:
    """``item`` (a prediction item, or a batch item read back from JSON) at ``index``.

    Anything but ``status: ok`` is an error; ``cached`` counts only for answers.
    """
    if item.get("status") == "ok":
        return {
            "index": index,
            "status": "ok",
            "result": dict(item.get("result") or {}),
            "cached": bool(item.get("cached", False)),
        }
    return {
        "index": index,
        "status": "error",
        "problem": dict(item.get("problem") or {}),
        "cached": False,
    }


def _located(position: int, item: Any) -> BatchItem:
    if not isinstance(item, Mapping):
        return batch_item(position, lost_item())
    return batch_item(int(item.get("index", position)), item)


def batch_document(
    items: Iterable[Any],
    *,
    job_id: str | None,
    request_id: str | None,
    elapsed_ms: float | None,
) -> BatchDocument:
    """The batch document of ``items`` (each with its ``index``), sorted by index, with counts.

    ``items`` may come from JSON (a job record, a task result): an item
    without ``index`` takes its position, and one that is not an object is
    answered 503. ``elapsed_ms`` is rounded to the microsecond.
    """
    ordered = sorted(
        (_located(position, item) for position, item in enumerate(items)),
        key=lambda it: it["index"],
    )
    succeeded = sum(1 for it in ordered if it["status"] == "ok")
    return {
        "items": ordered,
        "counts": {
            "total": len(ordered),
            "succeeded": succeeded,
            "failed": len(ordered) - succeeded,
            "cached": sum(1 for it in ordered if it["cached"]),
        },
        "elapsed_ms": None if elapsed_ms is None else round(elapsed_ms, 3),
        "request_id": request_id,
        "job_id": job_id,
    }


def assemble(
    chunk_results: Sequence[Sequence[PredictionItem] | None], meta: BatchMeta
) -> BatchDocument:
    """The document of a batch from its chunks' answers and what the API answered itself.

    ``chunk_results`` are in the order of ``meta["chunks"]``; a chunk that came
    back short (or not at all) leaves its missing items answered 503. The
    document's ``job_id`` and ``elapsed_ms`` are left to the API.
    """
    chunks = meta.get("chunks") or []
    answered = meta.get("answered") or {}
    total = int(meta.get("total", len(answered) + sum(len(c) for c in chunks)))
    slots: list[Mapping[str, Any] | None] = [None] * total
    for index, item in answered.items():
        slots[int(index)] = item
    for indices, results in zip_longest(chunks, chunk_results):
        results = results or []
        for j, index in enumerate(indices or []):
            slots[index] = results[j] if j < len(results) else lost_item()
    items = [{"index": i, **(item or lost_item())} for i, item in enumerate(slots)]
    return batch_document(
        items,
        job_id=None,
        request_id=meta.get("request_id"),
        elapsed_ms=None,
    )
