"""The traffic policy: validation and sticky weighted routing (pure functions)."""

from __future__ import annotations

from collections import Counter

import pytest

from heimdall.traffic import (
    InvalidPolicy,
    PolicyMemo,
    allowed_targets,
    default_policy,
    parse_policy,
    route,
    route_point,
)

ALLOWED = allowed_targets("champion", ["challenger", "7"])


def test_a_fifty_fifty_split_sends_between_400_and_600_of_1000_keys_to_each() -> None:
    policy = parse_policy({"weights": {"champion": 50, "challenger": 50}}, ALLOWED)
    counts = Counter(route(f"request-{i}", policy) for i in range(1_000))
    assert set(counts) == {"champion", "challenger"}
    assert 400 <= counts["champion"] <= 600
    assert 400 <= counts["challenger"] <= 600


def test_a_ninety_ten_split_follows_the_weights() -> None:
    policy = parse_policy({"weights": {"champion": 90, "challenger": 10}}, ALLOWED)
    counts = Counter(route(f"k{i}", policy) for i in range(5_000))
    assert 400 <= counts["challenger"] <= 600


def test_the_same_key_always_lands_on_the_same_target() -> None:
    policy = parse_policy({"weights": {"champion": 50, "challenger": 50, "7": 1}}, ALLOWED)
    for i in range(200):
        first = route(f"client-{i}", policy)
        assert all(route(f"client-{i}", policy) == first for _ in range(5))
    # The order the weights were written in does not matter.
    reordered = parse_policy({"weights": {"7": 1, "challenger": 50, "champion": 50}}, ALLOWED)
    assert all(route(f"c{i}", policy) == route(f"c{i}", reordered) for i in range(200))


def test_route_point_is_the_documented_hash() -> None:
    import hashlib

    expected = int(hashlib.sha256(b"route:abc").hexdigest()[:15], 16) / 16**15
    assert route_point("abc") == expected
    assert 0.0 <= route_point("") < 1.0


def test_zero_weight_targets_get_nothing() -> None:
    policy = parse_policy({"weights": {"champion": 0, "challenger": 3}}, ALLOWED)
    assert {route(str(i), policy) for i in range(300)} == {"challenger"}
    assert policy.targets == ("challenger",)


def test_the_default_policy_sends_all_to_the_champion() -> None:
    policy = default_policy("champion")
    assert policy.sends_all_to("champion")
    assert {route(str(i), policy) for i in range(100)} == {"champion"}
    assert policy.to_dict()["weights"] == {"champion": 100}


def test_shadow_targets_are_kept_in_order_without_duplicates() -> None:
    policy = parse_policy(
        {"weights": {"champion": 1}, "shadow": ["challenger", "7", "challenger"]}, ALLOWED
    )
    assert policy.shadow == ("challenger", "7")
    assert not policy.sends_all_to("champion")


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ([], None),
        ({}, "weights"),
        ({"weights": {}}, "weights"),
        ({"weights": {"champion": -1}}, "weights.champion"),
        ({"weights": {"champion": 1.5}}, "weights.champion"),
        ({"weights": {"champion": True}}, "weights.champion"),
        ({"weights": {"champion": 0}}, "weights"),
        ({"weights": {"nobody": 1}}, "weights.nobody"),
        ({"weights": {"champion": 1}, "shadow": "challenger"}, "shadow"),
        ({"weights": {"champion": 1}, "shadow": ["nobody"]}, "shadow[0]"),
        ({"weights": {"champion": 1}, "wieghts": {}}, "wieghts"),
    ],
)
def test_invalid_policies_are_refused_with_the_field(document: object, field: str | None) -> None:
    with pytest.raises(InvalidPolicy) as caught:
        parse_policy(document, ALLOWED)
    assert caught.value.status == 422
    assert caught.value.field == field


def test_a_stored_policy_is_read_back_without_the_served_set() -> None:
    stored = {"weights": {"old": 1}, "shadow": [], "updated_at": 5.0, "updated_by": "r1"}
    policy = parse_policy(stored, None)
    assert policy.to_dict() == stored


def test_the_memo_keeps_the_last_policy_when_redis_is_down() -> None:
    import redis

    now = [0.0]
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    memo = PolicyMemo(dead, "champion", ttl_s=1.0, clock=lambda: now[0])
    assert memo.current() == default_policy("champion")
    now[0] = 5.0
    assert memo.current() == default_policy("champion")
