"""The API's view of the served model: its card (for validation) and version (for cache keys).

The API resolves ``name@alias`` through :mod:`heimdall.registry` and trusts the
answer for ``model_refresh_s`` seconds. It never creates an inference session:
onnxruntime and :mod:`heimdall.runtime` stay in the worker children.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from heimdall import registry
from heimdall.config import Settings
from heimdall.errors import ModelUnavailable
from heimdall.registry import ResolvedModel

log = logging.getLogger("heimdall.api.model")

RETRY_AFTER_FAILURE_S = 5.0
"""When a refresh fails but an older model is known, ask the registry again this soon."""

NEGATIVE_CACHE_S = 1.0
"""With no model at all, a failed lookup is repeated to clients for this long (seconds)
rather than asking the registry again on every request."""


class ServedModel:
    """``registry.resolve(settings)`` cached in-process for ``model_refresh_s`` seconds."""

    def __init__(
        self,
        settings: Settings,
        resolver: Callable[[Settings], ResolvedModel] = registry.resolve,
    ) -> None:
        self.settings = settings
        self._resolver = resolver
        self._model: ResolvedModel | None = None
        self._expires = 0.0
        self._refreshing = threading.Lock()
        self._failure: tuple[float, ModelUnavailable] | None = None

    def current(self) -> ResolvedModel:
        """The model in force; raises ModelUnavailable (503) when none can be resolved.

        One thread refreshes at a time; while it does, the others keep the model
        they already have instead of queueing behind the registry.
        """
        model = self._model
        if model is not None and time.monotonic() < self._expires:
            return model
        if model is not None and not self._refreshing.acquire(blocking=False):
            return model
        if model is None:
            failure = self._failure
            if failure is not None and time.monotonic() < failure[0]:
                known = failure[1]
                raise type(known)(known.detail, field=known.field, **known.extra)
            self._refreshing.acquire()
        try:
            return self._refresh()
        finally:
            self._refreshing.release()

    def _refresh(self) -> ResolvedModel:
        if self._model is not None and time.monotonic() < self._expires:
            return self._model  # another thread refreshed while this one waited
        previous = self._model
        try:
            model = self._resolver(self.settings)
        except ModelUnavailable as exc:
            if previous is None:
                self._remember_failure(exc)
                raise
            log.warning(
                "model refresh failed, keeping the previous version",
                extra={"version": previous.identity.version, "error": exc.detail},
            )
            self._expires = time.monotonic() + min(
                RETRY_AFTER_FAILURE_S, self.settings.model_refresh_s
            )
            return previous
        except Exception as exc:
            # The registry itself is down (database, network): a dependency outage.
            if previous is None:
                unavailable = ModelUnavailable(
                    f"the model registry at {self.settings.tracking_uri} cannot be reached: "
                    f"{type(exc).__name__}"
                )
                self._remember_failure(unavailable)
                raise unavailable from exc
            log.warning(
                "model registry unreachable, keeping the previous version",
                extra={"version": previous.identity.version, "error": repr(exc)},
            )
            self._expires = time.monotonic() + min(
                RETRY_AFTER_FAILURE_S, self.settings.model_refresh_s
            )
            return previous
        if previous is None or previous.identity != model.identity:
            log.info(
                "serving model",
                extra={
                    "model": model.identity.name,
                    "version": model.identity.version,
                    "alias": model.identity.alias,
                },
            )
        self._model = model
        self._failure = None
        self._expires = time.monotonic() + self.settings.model_refresh_s
        return model

    def _remember_failure(self, exc: ModelUnavailable) -> None:
        ttl = min(NEGATIVE_CACHE_S, self.settings.model_refresh_s)
        self._failure = (time.monotonic() + ttl, exc)
