"""The traffic policy: which served version answers a request, and which ones shadow it.

A policy is a weighted split over targets (the champion alias, or one of
``settings.extra_models``: an alias such as ``challenger`` or a version number)
plus a list of shadow targets that get a copy of each computed request. It is
kept as JSON under :data:`heimdall.contract.TRAFFIC_KEY` in the state Redis so
every API process routes alike; absent, everything goes to the champion.

Routing is sticky: the same routing key under the same policy always picks the
same target, so a retried request lands on the version that answered it first.
Nothing here knows HTTP; invalid policies raise :class:`InvalidPolicy` (422).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from heimdall import contract
from heimdall.errors import InvalidInput

log = logging.getLogger(__name__)

MAX_ROUTING_KEY_CHARS = 200
"""Longest client-supplied ``routing_key``."""

MEMO_S = 1.0
"""How long an API process trusts the policy it read from Redis, seconds."""

_ROUTE_DIGITS = 15
"""Hex digits of the routing hash used as a uniform number in [0, 1)."""


class InvalidPolicy(InvalidInput):
    """A traffic policy that cannot be applied (unknown target, bad weights)."""

    type = "invalid-traffic-policy"
    title = "Invalid traffic policy"


@dataclass(frozen=True)
class TrafficPolicy:
    """Weights per target (non-negative integers, sum > 0) and the shadow targets."""

    weights: tuple[tuple[str, int], ...]
    """``(target, weight)`` sorted by target name: the order routing walks."""
    shadow: tuple[str, ...] = ()
    updated_at: float | None = None
    updated_by: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """Targets that can receive traffic (weight > 0), by name."""
        return tuple(name for name, weight in self.weights if weight > 0)

    def sends_all_to(self, target: str) -> bool:
        """Whether every request goes to ``target`` and nothing is shadowed."""
        return self.targets == (target,) and not self.shadow

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored in Redis and shown to operators."""
        return {
            "weights": dict(self.weights),
            "shadow": list(self.shadow),
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
        }


def default_policy(champion: str) -> TrafficPolicy:
    """Everything to the champion, no shadow: the policy when none is stored."""
    return TrafficPolicy(weights=((champion, 100),))


def allowed_targets(champion: str, extra: Iterable[str]) -> tuple[str, ...]:
    """The targets a policy may name: the champion alias and the extra served models."""
    return (champion, *(t for t in extra if t != champion))


def parse_policy(
    data: Any,
    allowed: Sequence[str] | None,
    *,
    updated_at: float | None = None,
    updated_by: str | None = None,
) -> TrafficPolicy:
    """Validate ``{"weights": {target: int}, "shadow": [target]}`` into a policy.

    With ``allowed`` every target must be one of them (the served targets);
    ``None`` checks the shape only (a stored policy read back).
    """
    if not isinstance(data, Mapping):
        raise InvalidPolicy("the traffic policy must be a JSON object with 'weights'")
    unknown = sorted(set(data) - {"weights", "shadow", "updated_at", "updated_by"})
    if unknown:
        raise InvalidPolicy(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected 'weights' and 'shadow'",
            field=unknown[0],
        )
    weights = data.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise InvalidPolicy(
            "'weights' must be a non-empty object of target -> integer weight", field="weights"
        )
    parsed: dict[str, int] = {}
    for target, weight in weights.items():
        where = f"weights.{target}"
        _check_target(target, allowed, where)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise InvalidPolicy(
                f"the weight of {target!r} must be a non-negative integer, got {weight!r}",
                field=where,
            )
        parsed[target] = weight
    if sum(parsed.values()) <= 0:
        raise InvalidPolicy("the weights must add up to more than 0", field="weights")
    shadow = data.get("shadow", [])
    if not isinstance(shadow, list) or not all(isinstance(t, str) for t in shadow):
        raise InvalidPolicy("'shadow' must be a list of target names", field="shadow")
    for i, target in enumerate(shadow):
        _check_target(target, allowed, f"shadow[{i}]")
    return TrafficPolicy(
        weights=tuple(sorted(parsed.items())),
        shadow=tuple(dict.fromkeys(shadow)),
        updated_at=updated_at if updated_at is not None else _number(data.get("updated_at")),
        updated_by=updated_by if updated_by is not None else _text(data.get("updated_by")),
    )


def _check_target(target: Any, allowed: Sequence[str] | None, where: str) -> None:
    if not isinstance(target, str) or not target:
        raise InvalidPolicy("a target must be a non-empty string", field=where)
    if allowed is not None and target not in allowed:
        raise InvalidPolicy(
            f"{target!r} is not a served model; targets are the champion and "
            f"HEIMDALL_EXTRA_MODELS: {', '.join(allowed)}",
            field=where,
            target=target,
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def route_point(key: str) -> float:
    """The routing key as a number in [0, 1): ``int(sha256("route:" + key)[:15], 16) / 16**15``."""
    digest = hashlib.sha256(("route:" + key).encode()).hexdigest()
    return int(digest[:_ROUTE_DIGITS], 16) / 16**_ROUTE_DIGITS


def route(key: str, policy: TrafficPolicy) -> str:
    """The target that answers requests with routing key ``key`` under ``policy``.

    Targets are walked by name with cumulative weights, so a key's place on
    [0, 1) decides, and the same key with the same policy always lands alike.
    """
    total = sum(weight for _, weight in policy.weights)
    point = route_point(key) * total
    cumulative = 0
    for target, weight in policy.weights:
        cumulative += weight
        if weight > 0 and point < cumulative:
            return target
    return policy.targets[-1]  # unreachable: point < total


def read_policy(client: redis.Redis, champion: str) -> TrafficPolicy:
    """The stored policy, or :func:`default_policy` when none is (raises on Redis errors).

    A stored document that no longer parses is logged and ignored (champion only).
    """
    raw = client.get(contract.TRAFFIC_KEY)
    if raw is None:
        return default_policy(champion)
    try:
        return parse_policy(json.loads(raw), None)
    except (ValueError, InvalidPolicy) as exc:
        log.error(
            "stored traffic policy unreadable, routing everything to the champion",
            extra={"error": str(exc)},
        )
        return default_policy(champion)


def write_policy(client: redis.Redis, policy: TrafficPolicy) -> None:
    """Store ``policy`` for every API process (no TTL)."""
    client.set(contract.TRAFFIC_KEY, json.dumps(policy.to_dict(), sort_keys=True))


class PolicyMemo:
    """The stored policy, read from Redis at most once per ``ttl_s`` per process.

    When Redis does not answer, the last policy read keeps applying (the
    default one if none was ever read), so routing never fails a request.
    """

    def __init__(
        self,
        client: redis.Redis,
        champion: str,
        ttl_s: float = MEMO_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._champion = champion
        self._ttl_s = ttl_s
        self._clock = clock
        self._policy = default_policy(champion)
        self._expires = 0.0
        self._lock = threading.Lock()

    def current(self) -> TrafficPolicy:
        """The policy in force (at most ``ttl_s`` old)."""
        if self._clock() < self._expires:
            return self._policy
        with self._lock:
            if self._clock() < self._expires:
                return self._policy
            try:
                self._policy = read_policy(self._client, self._champion)
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "traffic policy unreadable, keeping the last one",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            self._expires = self._clock() + self._ttl_s
            return self._policy

    def forget(self) -> None:
        """Read the policy again on the next call (after this process changed it)."""
        self._expires = 0.0
