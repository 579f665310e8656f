"""``RecentCache``: bounded least-recently-used, ``fresh()`` honours the time to live, plain
lookups do not, and threads share one safely."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest

import agent.cache
from agent.cache import RecentCache


class Clock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(agent.cache, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


def test_entries_beyond_max_items_are_dropped_oldest_first():
    cache: RecentCache[int] = RecentCache(max_items=3)
    for i, key in enumerate("abcde"):
        cache[key] = i
    assert list(cache) == ["c", "d", "e"] and len(cache) == 3
    assert "a" not in cache and "b" not in cache


def test_a_read_keeps_an_entry_a_membership_test_does_not():
    cache: RecentCache[int] = RecentCache(max_items=3)
    cache["a"], cache["b"], cache["c"] = 1, 2, 3
    assert cache["a"] == 1  # now the most recent
    assert "b" in cache  # not a use
    cache["d"] = 4
    assert list(cache) == ["c", "a", "d"]


def test_storing_again_replaces_and_keeps_the_entry():
    cache: RecentCache[str] = RecentCache(max_items=2)
    cache["a"], cache["b"] = "old", "b"
    cache["a"] = "new"
    cache["c"] = "c"
    assert dict(cache) == {"a": "new", "c": "c"}


def test_a_fresh_read_keeps_an_entry():
    cache: RecentCache[int] = RecentCache(max_items=2)
    cache["a"], cache["b"] = 1, 2
    assert cache.fresh("a") == 1
    cache["c"] = 3
    assert list(cache) == ["a", "c"]


def test_fresh_treats_entries_older_than_the_ttl_as_absent(clock: Clock):
    cache: RecentCache[str] = RecentCache(ttl_s=60.0)
    cache["p1"] = "record"
    clock.now += 60.0
    assert cache.fresh("p1") == "record"  # exactly ttl_s old is still fresh
    clock.now += 0.001
    assert cache.fresh("p1") is None
    # plain lookups keep what one run started with
    assert cache["p1"] == "record" and "p1" in cache and len(cache) == 1
    assert cache.get("p1") == "record"


def test_storing_again_makes_an_entry_fresh(clock: Clock):
    cache: RecentCache[str] = RecentCache(ttl_s=10.0)
    cache["p1"] = "v1"
    clock.now += 11
    assert cache.fresh("p1") is None
    cache["p1"] = "v2"
    assert cache.fresh("p1") == "v2"


def test_a_stale_entry_read_with_fresh_is_not_kept(clock: Clock):
    cache: RecentCache[int] = RecentCache(max_items=2, ttl_s=10.0)
    cache["a"] = 1
    clock.now += 11
    cache["b"] = 2
    assert cache.fresh("a") is None
    cache["c"] = 3
    assert list(cache) == ["b", "c"]


def test_missing_keys():
    cache: RecentCache[int] = RecentCache()
    assert cache.fresh("nobody") is None
    assert cache.get("nobody") is None and "nobody" not in cache
    with pytest.raises(KeyError):
        cache["nobody"]
    with pytest.raises(KeyError):
        del cache["nobody"]


def test_it_is_a_mutable_mapping():
    cache: RecentCache[int] = RecentCache(max_items=3)
    cache.update({"a": 1, "b": 2})
    assert cache.setdefault("b", 9) == 2 and cache.setdefault("c", 3) == 3
    assert cache.pop("a") == 1 and "a" not in cache
    del cache["b"]
    assert dict(cache) == {"c": 3}
    cache.clear()
    assert len(cache) == 0 and list(cache) == []


def test_iteration_is_over_a_snapshot():
    cache: RecentCache[int] = RecentCache()
    cache["a"], cache["b"] = 1, 2
    seen = []
    for key in cache:
        seen.append(key)
        cache[key + "x"] = 0  # no "mutated during iteration"
    assert seen == ["a", "b"] and len(cache) == 4


def test_max_items_zero_keeps_nothing():
    cache: RecentCache[int] = RecentCache(max_items=0)
    cache["a"] = 1
    assert len(cache) == 0 and cache.fresh("a") is None


def test_a_default_cache_is_bounded():
    cache: RecentCache[int] = RecentCache()
    for i in range(cache.max_items + 10):
        cache[str(i)] = i
    assert len(cache) == cache.max_items
    assert "0" not in cache and str(cache.max_items + 9) in cache


class _SlowOrder(OrderedDict[str, Any]):
    """Storage that gives up the processor before each reordering, so that without the cache's
    lock another thread would delete the key between ``fresh()``'s lookup and its reordering."""

    def move_to_end(self, key: str, last: bool = True) -> None:
        time.sleep(0.0001)
        super().move_to_end(key, last)


def test_threads_share_one_cache_within_its_bound():
    cache: RecentCache[int] = RecentCache(max_items=50, ttl_s=300.0)
    cache._items = _SlowOrder()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(300):
                key, other = f"{n}-{i % 60}", f"{(n + 1) % 8}-{i % 60}"
                cache[key] = i
                cache.fresh(other)
                with contextlib.suppress(KeyError):  # another thread's key: maybe not there
                    del cache[other]
                cache.get(key)
                if i % 50 == 0:
                    assert len(list(cache)) <= 50
        except BaseException as e:  # reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache) <= 50 and len(list(cache)) == len(cache)
