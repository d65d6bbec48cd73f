"""The API's view of the served models: their cards (for validation) and versions (cache keys).

The API serves the champion (``model_alias``) and the extra targets of
``extra_models`` (aliases or version numbers), resolves each through
:func:`heimdall.lifecycle.resolve_target` and trusts the answer for
``model_refresh_s`` seconds. The traffic policy (:mod:`heimdall.traffic`)
chooses which target answers a request (:meth:`ServedModels.choose`). The API
never creates an inference session: onnxruntime and :mod:`heimdall.runtime`
stay in the worker children.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from heimdall import contract, lifecycle
from heimdall.config import Settings
from heimdall.errors import ModelUnavailable
from heimdall.registry import ResolvedModel
from heimdall.traffic import TrafficPolicy, allowed_targets, route

log = logging.getLogger("heimdall.api.model")

RETRY_AFTER_FAILURE_S = 5.0
"""When a refresh fails but an older model is known, ask the registry again this soon."""

NEGATIVE_CACHE_S = 1.0
"""With no model at all, a failed lookup is repeated to clients for this long (seconds)
rather than asking the registry again on every request."""


class ServedModel:
    """One target (alias or version number) resolved and cached for ``model_refresh_s`` seconds."""

    def __init__(
        self,
        settings: Settings,
        target: str | None = None,
        resolver: Callable[[Settings, str], ResolvedModel] = lifecycle.resolve_target,
    ) -> None:
        self.settings = settings
        self.target = target or settings.model_alias
        self._resolver = resolver
        self._model: ResolvedModel | None = None
        self._expires = 0.0
        self._refreshing = threading.Lock()
        self._failure: tuple[float, ModelUnavailable] | None = None
        self.since: float | None = None
        """Epoch seconds when this process started serving the current version."""

    def forget(self) -> None:
        """Ask the registry again on the next call (after an alias moved)."""
        self._expires = 0.0
        self._failure = None

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
            model = self._resolver(self.settings, self.target)
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
            self.since = time.time()
            log.info(
                "serving model",
                extra={
                    "target": self.target,
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


@dataclass(frozen=True)
class Choice:
    """Which target answers one request, and the version it is validated and cached under."""

    target: str
    """The target as the policy names it (``champion``, ``challenger``, ``"7"``)."""
    model: ResolvedModel
    """The resolved version of ``target``; the champion's when ``fallback_reason`` is set."""
    fallback_reason: str | None = None
    """Set when ``target`` could not be resolved, so the champion answers instead."""

    @property
    def version(self) -> str:
        """Registry version that is expected to answer."""
        return self.model.identity.version

    def message_fields(self) -> dict[str, str]:
        """The job message fields naming this choice (``version``, ``alias``).

        An unresolved target is sent by alias only: a worker that holds it
        answers with it, any other falls back to the champion and says so.
        """
        if self.fallback_reason is not None:
            return {contract.MSG_ALIAS: self.target}
        return {contract.MSG_VERSION: self.version, contract.MSG_ALIAS: self.target}


class ServedModels:
    """The champion and the extra targets, each a :class:`ServedModel`."""

    def __init__(
        self,
        settings: Settings,
        resolver: Callable[[Settings, str], ResolvedModel] = lifecycle.resolve_target,
    ) -> None:
        self.settings = settings
        self.champion_target = settings.model_alias
        self.targets = allowed_targets(settings.model_alias, settings.extra_models)
        self._models = {t: ServedModel(settings, t, resolver) for t in self.targets}

    def current(self) -> ResolvedModel:
        """The champion in force; raises ModelUnavailable (503) when none can be resolved."""
        return self._models[self.champion_target].current()

    def served(self, target: str) -> ServedModel | None:
        """The cached view of one target (None when it is not served)."""
        return self._models.get(target)

    def resolve(self, target: str) -> ResolvedModel | None:
        """``target``'s version, or None when it is not served or does not resolve (logged)."""
        served = self._models.get(target)
        if served is None:
            return None
        try:
            return served.current()
        except ModelUnavailable as exc:
            log.debug("target not resolvable", extra={"target": target, "error": exc.detail})
            return None

    def choose(self, key: str, policy: TrafficPolicy) -> Choice:
        """The target ``policy`` routes ``key`` to, resolved; the champion if it cannot be.

        Raises ModelUnavailable (503) only when the champion itself is unavailable.
        """
        target = route(key, policy)
        if target == self.champion_target:
            return Choice(target, self.current())
        model = self.resolve(target)
        if model is not None:
            return Choice(target, model)
        return Choice(target, self.current(), fallback_reason=f"target {target} is not registered")

    def forget(self) -> None:
        """Ask the registry again for every target on next use (after an alias moved)."""
        for served in self._models.values():
            served.forget()
