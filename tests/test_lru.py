"""The one LRU helper behind the RAM tier, parked sessions and resident module runs."""

from __future__ import annotations

import pytest

from pccpu.errors import ConfigError
from pccpu.store.lru import Lru


def test_put_evicts_least_recently_used_first() -> None:
    lru: Lru[str, int] = Lru(10)
    assert lru.put("a", 1, 4) == [] and lru.put("b", 2, 4) == []
    assert lru.get("a") == 1  # a is now the most recently used
    assert lru.put("c", 3, 4) == [("b", 2)]
    assert list(lru) == ["a", "c"] and lru.used == 8 and lru.evictions == 1


def test_pinned_and_protected_items_stay() -> None:
    lru: Lru[str, int] = Lru(10)
    lru.put("a", 1, 5)
    lru.put("b", 2, 5)
    lru.pin("a")
    assert lru.put("c", 3, 6, protect={"b"}) is None  # a pinned, b protected: no room, nothing changes
    assert list(lru) == ["a", "b"]
    assert lru.put("c", 3, 5) == [("b", 2)]


def test_an_item_larger_than_the_budget_is_refused() -> None:
    lru: Lru[str, int] = Lru(3)
    lru.put("a", 1, 2)
    assert lru.put("big", 9, 4) is None
    assert list(lru) == ["a"] and lru.used == 2


def test_replacing_and_popping_keep_the_size_right() -> None:
    lru: Lru[str, int] = Lru(10)
    lru.put("a", 1, 4)
    lru.put("a", 2, 6)
    assert lru.used == 6 and lru.peek("a") == 2 and lru.size_of("a") == 6
    assert lru.pop("a") == 2 and lru.pop("a") is None and lru.used == 0
    lru.put("x", 1, 1)
    assert lru.clear() == [("x", 1)] and len(lru) == 0 and lru.used == 0


def test_negative_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Lru(-1)
