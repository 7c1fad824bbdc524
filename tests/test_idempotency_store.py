"""The store protocol (issue #10): both stores hold the same contract, and the embedded one is bounded."""

from __future__ import annotations

import asyncio

import pytest

from envelope_middleware.idempotency import Held, IdempotencyStore, MemoryStore


async def test_store_first_claim_wins_and_later_ones_see_it_in_flight(store: IdempotencyStore) -> None:
    assert await store.claim("op", "t1", b"fp", 10) is None
    held = await store.claim("op", "t2", b"other", 10)
    assert isinstance(held, Held)
    assert held == Held(b"fp", None)


async def test_store_completed_claim_returns_its_response(store: IdempotencyStore) -> None:
    await store.claim("op", "t1", b"fp", 10)
    assert await store.complete("op", "t1", b"answer", 60) is True
    assert await store.claim("op", "t2", b"fp", 10) == Held(b"fp", b"answer")


async def test_store_only_the_claims_holder_completes_or_releases_it(store: IdempotencyStore) -> None:
    await store.claim("op", "t1", b"fp", 10)
    assert await store.complete("op", "intruder", b"answer", 60) is False
    await store.release("op", "intruder")
    held = await store.claim("op", "t2", b"fp", 10)
    assert held is not None
    assert held.response is None


async def test_store_release_frees_the_key_for_the_next_claim(store: IdempotencyStore) -> None:
    await store.claim("op", "t1", b"fp", 10)
    await store.release("op", "t1")
    assert await store.claim("op", "t2", b"fp2", 10) is None


async def test_store_a_completed_record_is_not_released_nor_completed_twice(store: IdempotencyStore) -> None:
    await store.claim("op", "t1", b"fp", 10)
    await store.complete("op", "t1", b"answer", 60)
    await store.release("op", "t1")
    assert await store.complete("op", "t1", b"other", 60) is False
    held = await store.claim("op", "t2", b"fp", 10)
    assert held is not None
    assert held.response == b"answer"


async def test_store_a_lost_lease_leaves_the_late_holder_nothing_to_change(store: IdempotencyStore) -> None:
    await store.claim("op", "slow", b"fp", 0.1)
    await asyncio.sleep(0.15)
    assert await store.claim("op", "next", b"fp", 10) is None
    assert await store.complete("op", "slow", b"late", 60) is False
    await store.release("op", "slow")
    held = await store.claim("op", "third", b"fp", 10)
    assert held is not None
    assert held.response is None  # still the second claim, in flight


async def test_store_records_expire(store: IdempotencyStore) -> None:
    await store.claim("op", "t1", b"fp", 10)
    await store.complete("op", "t1", b"answer", 0.1)
    await asyncio.sleep(0.15)
    assert await store.claim("op", "t2", b"fp", 10) is None


async def test_store_keys_are_independent(store: IdempotencyStore) -> None:
    assert await store.claim("a", "t1", b"fp", 10) is None
    assert await store.claim("b", "t2", b"fp", 10) is None


# -- the embedded store's bounds -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_memory_store_evicts_the_oldest_records_past_max_entries() -> None:
    store = MemoryStore(max_entries=3)
    for name in "abcd":
        await store.claim(name, "t", b"fp", 10)
        await store.complete(name, "t", b"answer", 60)
    assert len(store) == 3
    assert await store.claim("a", "t", b"fp", 10) is None  # evicted: runs again
    assert await store.claim("d", "t", b"fp", 10) is not None


async def test_memory_store_never_evicts_a_claim_in_flight() -> None:
    store = MemoryStore(max_entries=2)
    await store.claim("running", "t", b"fp", 10)
    for name in "abc":
        await store.claim(name, "t", b"fp", 10)
        await store.complete(name, "t", b"answer", 60)
    assert await store.claim("running", "t2", b"fp", 10) == Held(b"fp", None)
    assert len(store) == 3  # the claim, and the two newest records


async def test_memory_store_claims_in_flight_do_not_count_against_its_bounds() -> None:
    store = MemoryStore(max_entries=2)
    for name in "abcde":
        await store.claim(name, "t", b"fp", 10)
    assert len(store) == 5
    await store.complete("a", "t", b"answer", 60)
    for name in "abcde":
        assert await store.claim(name, "t2", b"fp", 10) is not None


async def test_memory_store_bounds_its_bytes() -> None:
    store = MemoryStore(max_bytes=1000)
    for index in range(10):
        await store.claim(str(index), "t", b"fp", 10)
        await store.complete(str(index), "t", b"x" * 300, 60)
    assert store.size_bytes == 3 * 302
    assert len(store) == 3
    assert await store.claim("9", "t", b"fp", 10) is not None
    assert await store.claim("6", "t", b"fp", 10) is None  # evicted, oldest first


async def test_memory_store_a_claim_completed_after_its_lease_is_lost() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.claim("op", "t", b"fp", 1)
    clock.now = 2
    assert await store.complete("op", "t", b"late", 60) is False
    assert len(store) == 0
    assert await store.claim("op", "t2", b"fp", 1) is None


async def test_memory_store_expiry_follows_its_clock() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.claim("op", "t", b"fp", 30)
    clock.now = 29.9
    assert await store.claim("op", "t2", b"fp", 30) is not None
    clock.now = 30
    assert await store.claim("op", "t2", b"fp", 30) is None
    await store.complete("op", "t2", b"answer", 60)
    assert store.size_bytes == len(b"fp") + len(b"answer")
    clock.now = 89.9
    assert await store.claim("op", "t3", b"fp", 30) == Held(b"fp", b"answer")
    clock.now = 90
    assert await store.claim("op", "t3", b"fp", 30) is None
    assert store.size_bytes == 0


@pytest.mark.parametrize(
    "options", [{"max_entries": 0}, {"max_bytes": 0}, {"max_entries": 1.5}, {"max_bytes": True}]
)
def test_memory_store_refuses_bounds_that_are_not_positive_ints(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="positive int"):
        MemoryStore(**options)  # type: ignore[arg-type]
